"""Compile the router's decision path with mypyc, in place, where its sources changed since
the last build (``router/compiled.py`` says which modules and why). Run by deploy/ensure.sh.

    .venv/bin/python deploy/compile_router.py            build if stale (instant when current)
    .venv/bin/python deploy/compile_router.py --status   which modules run compiled here

The compiler's output goes to build/mypyc/build.log; one line says what happened. A failed
build is not fatal: the router runs the same modules from source, slower.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.compiled import MODULES, ROOT, digest, recorded, running_compiled, source, stale, stamp_path  # noqa: E402


def _built(module: str) -> bool:
    here = source(module)
    return here.with_name(here.stem + importlib.machinery.EXTENSION_SUFFIXES[0]).exists()


@contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """The process's stdout and stderr (gcc's too: it writes to the inherited descriptors) into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def build() -> int:
    """0 when the build is current or done, 1 when it could not be made."""
    record = recorded()
    if record and not stale(record) and all(_built(m) for m in MODULES):
        return 0
    try:
        from mypyc.build import mypycify
        from setuptools import setup
    except ImportError as e:
        print(f"compile_router: cannot compile the router's decision path ({e}); it runs from source")
        return 1
    stamp_path().unlink(missing_ok=True)  # until this build is whole, no extension is trusted
    work = ROOT / "build" / "mypyc"
    cwd = os.getcwd()
    os.chdir(ROOT)  # mypyc names each module by its path from here
    log = work / "build.log"
    # A cache of its own, emptied first: mypyc reusing an earlier build's incremental cache
    # failed on a one-line docstring change (ValueError in emit_undefined_attr_check); a
    # build runs only when a source changed, and a whole one takes about a minute.
    shutil.rmtree(work / "cache", ignore_errors=True)
    os.environ["MYPY_CACHE_DIR"] = str(work / "cache")
    try:
        paths = [str(source(m).relative_to(ROOT)) for m in MODULES]
        with _output_to(log):
            # separate=True: one extension per module with its runtime beside it, in its package
            # (one shared runtime would be a top-level module, found only from the checkout's root).
            extensions = mypycify(paths, separate=True, opt_level="3")
            setup(name="pdserve-router-compiled", ext_modules=extensions,  # type: ignore[arg-type]
                  script_args=["build_ext", "--inplace", "--build-temp", str(work / "temp"),
                               "--build-lib", str(work / "lib")])
    except (SystemExit, Exception) as e:  # mypyc and setuptools report failures as SystemExit
        print(f"compile_router: the build failed ({e!r}, see {log}); the router runs from source")
        return 1
    finally:
        os.chdir(cwd)
    stamp_path().write_text(json.dumps({m: digest(m) for m in MODULES}, indent=1) + "\n")
    print(f"compile_router: compiled the router's decision path ({len(MODULES)} modules, mypyc)")
    return 0


if __name__ == "__main__":
    if "--status" in sys.argv[1:]:
        for name, compiled in running_compiled().items():
            print(f"{name}: {'compiled' if compiled else 'source'}")
        sys.exit(0)
    sys.exit(build())
