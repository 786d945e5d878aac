"""Nothing that arrives over a wire or out of the store is ever run as code: the serving code
has no pickle, marshal, eval, exec, unsafe YAML or unrestricted torch.load. Every message is
msgpack or JSON into typed fields (kvstore/messages.py, router/protocol.py), every chunk raw
bytes checked against its checksum. This walks the syntax tree of every module of the
serving planes, so a new call is caught here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLANES = ("cluster", "router", "prefill_worker", "decode_worker", "kvstore")
MODULES = sorted(p for plane in PLANES for p in (REPO / plane).rglob("*.py"))

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def findings(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")
            if mod[0] in BANNED_MODULES or mod[-1] in BANNED_MODULES:
                found.append(f"{where} imports from {node.module}")
            found += [f"{where} imports {a.name}" for a in node.names if a.name in BANNED_MODULES]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if isinstance(fn, ast.Name) and name in BANNED_CALLS:
                found.append(f"{where} calls {name}()")
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            if owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load"}:
                found.append(f"{where} calls yaml.{name} (use yaml.safe_load)")
            if owner == "torch" and name == "load" and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            ):
                found.append(f"{where} calls torch.load without weights_only=True")
    return found


def test_the_walk_covers_every_plane() -> None:
    assert {p.relative_to(REPO).parts[0] for p in MODULES} == set(PLANES)
    assert len(MODULES) > 50


@pytest.mark.parametrize("plane", PLANES)
def test_no_plane_deserializes_code(plane: str) -> None:
    bad = [f for p in MODULES if p.relative_to(REPO).parts[0] == plane for f in findings(p)]
    assert not bad, "\n".join(bad)


def test_the_walk_would_catch_each_pattern(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle\nfrom marshal import loads\nimport yaml, torch\n"
                      "eval('1')\nexec('x=1')\nyaml.load(s)\ntorch.load(f)\ntorch.load(f, weights_only=True)\n")
    got = findings(sample, tmp_path)
    assert len(got) == 6, got
