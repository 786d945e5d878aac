#!/usr/bin/env bash
# ON THE GPU MACHINE, from the repo root, in the call that carries the last part (or any later
# call while the machine is warm): bring vLLM + Ray + Redis up from the carried parts and run
# `python3 -m pytest tests/gpu`. Everything is logged to $OUT/gpu-tests.log.
#
#   bash tools/gpu/run-tests.sh [extra pytest args]
#
# Needs: the .whl-gpu/pNN parts added with device-install.sh (or /tmp/site already there),
# .whl-gpu/extra carried in this call (or /tmp/pdextra already there): stage-extra.sh.
# Env knobs: PYTEST_BUDGET_S (420: pytest is interrupted, and tears its cluster down, after
# this long, leaving time to send the logs back inside a 600 s call), SITE (/tmp/site).
# After the tests: BENCH=1 also runs bench/gpu/kvpath.py (JSON to $OUT/gpu-kvpath.json),
# BENCH_LEGACY=1 then also its --legacy run (the per-layer path, $OUT/gpu-kvpath-legacy.json).
# SERVE_BENCH=1 runs bench/gpu/serve.py (pdserve 1P1D vs monolithic vLLM under load: JSON to
# $OUT/gpu-serve.json, tables to $OUT/gpu-serve.md, server + engine logs in
# $OUT/gpu-serve-logs.tar.xz) within SERVE_BENCH_BUDGET_S (270) and what is left of
# CALL_BUDGET_S (560: seconds from this script's start to the end of everything, inside one
# 600 s call); SERVE_BENCH_ARGS adds arguments (e.g. "--shape tiny --rates 4,16"); SERVE_BENCH_STREAMS
# ("channel serve", or "channel/grpc channel/ray" with router.serve_transport) runs it once per
# item, splitting the budget. TESTS=0 skips
# tests/gpu (the benchmarks alone). XXH3=1 first checks the GPU checksum kernels
# (tests/unit/test_gpu_xxh3.py on the GPU, then tools/gpu/xxh3-bench.py: $OUT/gpu-xxh3.json);
# those need only the image's packages, so they can also run alone in any call.
# KVPATH_TOOLS=1 also runs tools/gpu/kvpath-smoke.py and tools/gpu/kvpath-profile.py (logged here).
# OVERLAP=1 runs tests/gpu/test_layerwise_gpu.py (layer-wise save = whole-chunk save, byte for byte)
# and bench/gpu/overlap.py (a prefill step's save, layer by layer vs after the forward: JSON to
# $OUT/gpu-overlap.json) within OVERLAP_BUDGET_S (200); OVERLAP_ARGS adds arguments. No vLLM needed.
# CROSS=1 runs bench/gpu/crossgpu.py (KV between two processes' GPUs: $OUT/gpu-crossgpu.json)
# within CROSS_BUDGET_S (150).
# With TESTS=0 and no SERVE_BENCH the vLLM/Ray parts are not needed (nothing imports them: the KV
# path benchmark stands in for vLLM's base classes), so a call carrying only .whl-gpu/extra
# (redis-py for kvstore.client, redis-server) runs XXH3=1 BENCH=1 KVPATH_TOOLS=1 on its own.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/pdgpu-out}; mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
EXTRA=/tmp/pdextra
T0=$(date +%s)
say() { echo "[run-tests +$(( $(date +%s) - T0 ))s] $*"; }

save_ray_logs() {  # every 3 s: the .out/.err/.log files of each Ray session pdserve starts, into $1
  local dest=${1:-/tmp/pdgpu-logs}
  while sleep 3; do
    for d in /tmp/pdray-*/session_2*/logs; do
      [ -d "$d" ] || continue
      (cd "$d" && find . -type f \( -name '*.out' -o -name '*.err' -o -name '*.log' \) \
        -exec cp -u --parents {} "$dest/" \; 2>/dev/null)
    done
  done
}

main() {

# -- 1. the site tree (vLLM, Ray and their closure) and the extra part (redis-py, redis-server)
NEED_SITE=1
[ "${TESTS:-1}" = 0 ] && [ "${SERVE_BENCH:-0}" != 1 ] && NEED_SITE=0
if [ "$NEED_SITE" = 1 ] && [ ! -d "$SITE/vllm" ]; then
  bash tools/gpu/device-install.sh install "$SITE" || { say "install failed"; return 3; }
fi
if [ ! -x "$EXTRA/bin/redis-server" ]; then
  want=$(sed -n 's/^sha256=//p' .whl-gpu/extra/MANIFEST 2>/dev/null)
  got=$(sha256sum .whl-gpu/extra/extra.tar.xz 2>/dev/null | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$got" ] || { say "extra part missing or damaged (carry .whl-gpu/extra)"; return 3; }
  mkdir -p "$EXTRA" && xz -dc .whl-gpu/extra/extra.tar.xz | tar -xf - -C "$EXTRA"
fi
export PATH=$EXTRA/bin:$PATH
export PYTHONPATH=$REPO:$SITE:$EXTRA/site PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PDSERVE_GPU_TESTS_DEVICE=cuda  # never a silent skip here: no GPU found is a failure
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# -- 2. a python whose bin/ holds a `ray` script: `pdserve up` runs `<python's dir>/ray start`
# and the parts carry no console scripts. Written next to the image's python when that is
# writable (root there), else into a venv that sees the image's packages through a .pth file.
PY=$(command -v python3)
PYBIN=$(python3 -c 'import os, sys; print(os.path.dirname(sys.executable))')
if [ ! -x "$PYBIN/ray" ] && [ ! -w "$PYBIN" ]; then
  python3 -m venv --without-pip /tmp/pdvenv
  IMG_SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  VSITE=$(/tmp/pdvenv/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
  echo "$IMG_SITE" > "$VSITE/image.pth"
  PYBIN=/tmp/pdvenv/bin PY=/tmp/pdvenv/bin/python3
fi
if [ ! -x "$PYBIN/ray" ]; then
  printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' "$PYBIN/python3" > "$PYBIN/ray"
  chmod +x "$PYBIN/ray"
fi
if [ ! -x "$PYBIN/pdserve" ]; then  # bench/servers.py runs `<python's dir>/pdserve up` (the CLI)
  printf '#!%s\nimport sys\nfrom cluster.cli import main\nsys.exit(main())\n' "$PYBIN/python3" > "$PYBIN/pdserve"
  chmod +x "$PYBIN/pdserve"
fi
say "python $PY, ray script $PYBIN/ray"

# -- 3. what the machine is
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm /tmp | tail -2
nproc
if [ "$NEED_SITE" = 1 ]; then
"$PY" - <<'PYEOF'
import time
t = time.time()
import ray, redis, torch, vllm
print(f"IMPORT vllm {vllm.__version__} ray {ray.__version__} torch {torch.__version__} redis-py {redis.__version__} "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0)} in {time.time() - t:.1f}s")
PYEOF
else
"$PY" -c 'import redis, torch, triton; print(f"IMPORT (no vLLM/Ray parts) torch {torch.__version__} triton {triton.__version__} redis-py {redis.__version__} cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0)}")'
fi

# -- 4. Redis: the carried server starts and answers
redis-server --version
RPORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --save "" --appendonly no --daemonize yes --dir /tmp >/dev/null
for _ in $(seq 50); do redis-cli -p "$RPORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
if redis-cli -p "$RPORT" ping | grep -q PONG; then say "RESULT redis-server starts and answers PING"; else say "RESULT redis-server FAILED"; fi
redis-cli -p "$RPORT" shutdown nosave >/dev/null 2>&1

# -- 4b. optional: the GPU xxh3 kernels, bit for bit against xxhash, and their speed
if [ "${XXH3:-0}" = 1 ]; then
  say "GPU xxh3: tests/unit/test_gpu_xxh3.py + tools/gpu/xxh3-bench.py"
  "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_gpu_xxh3.py
  say "RESULT gpu xxh3 tests rc=$?"
  "$PY" tools/gpu/xxh3-bench.py --out "$OUT/gpu-xxh3.json"
fi

# -- 5. the tests. `pdserve down` (or a failed `up`) removes Ray's temp dir with every engine's
# log: a background copier keeps them in /tmp/pdgpu-logs for the post-mortem.
say "pytest tests/gpu (budget ${PYTEST_BUDGET_S:-420}s)"
rm -rf /tmp/pdgpu-pytest /tmp/pdgpu-logs && mkdir -p /tmp/pdgpu-logs
save_ray_logs /tmp/pdgpu-logs &
local saver=$!
if [ "${TESTS:-1}" = 0 ]; then  # TESTS=0: the benchmarks alone (a later call on a warm machine)
  say "tests/gpu skipped (TESTS=0)"; rc=0
else
# the test model's steps save 4 MiB at most: every one goes layer by layer (the default minimum
# is 32 MiB, kvstore.connector.layerwise_min_bytes); PDSERVE_LAYERWISE_SAVE=0 tests the old path
PDSERVE_LAYERWISE_SAVE_MIN_MIB=${PDSERVE_LAYERWISE_SAVE_MIN_MIB:-0} \
timeout -s INT -k 60 "${PYTEST_BUDGET_S:-420}" "$PY" -m pytest tests/gpu -v -s -rA -p no:cacheprovider \
  --basetemp=/tmp/pdgpu-pytest "$@"
rc=$?
fi
kill "$saver" 2>/dev/null; wait "$saver" 2>/dev/null
say "RESULT pytest tests/gpu rc=$rc"
tar -C /tmp/pdgpu-logs -cJf "$OUT/ray-logs.tar.xz" . && ls -la "$OUT"
if [ "$rc" != 0 ]; then  # the engines' tracebacks, into this log
  grep -rh -B3 -A25 -E "Traceback|Error in memory profiling|No available memory" /tmp/pdgpu-logs | head -300
fi
# each engine's KV cache: fixed by kv_cache_memory_bytes (tests/gpu/conftest.py), or profiled
grep -rhoE "reserved [0-9.]+ GiB memory for KV Cache|Available KV cache memory: [0-9.]+ GiB|GPU KV cache size: [0-9,]+ tokens" \
  /tmp/pdgpu-logs | sort | uniq -c
# the CUDA KV path's own start line in each engine (kvstore/gpu_path.py)
grep -rhoE "GPU KV path: .*|GPU xxh3 .*|one-launch KV gather .*|save overlapped with the forward .*" /tmp/pdgpu-logs \
  | sort | uniq -c

# -- 6. optional: the KV path bandwidth benchmark on the same machine
if [ "${BENCH:-0}" = 1 ]; then
  say "bench/gpu/kvpath.py"
  timeout -k 10 "${BENCH_BUDGET_S:-150}" "$PY" -m bench.gpu.kvpath --out "$OUT/gpu-kvpath.json"
  say "RESULT kvpath rc=$?"
  if [ "${BENCH_LEGACY:-0}" = 1 ]; then  # the generic per-layer path, on the same machine
    timeout -k 10 "${BENCH_BUDGET_S:-150}" "$PY" -m bench.gpu.kvpath --legacy --out "$OUT/gpu-kvpath-legacy.json"
    say "RESULT kvpath --legacy rc=$?"
  fi
fi

# -- 6a. optional: KV from a "prefill" process's GPU to a "decode" process's GPU through the store,
# against a peer copy, the pinned host round trip and a CUDA IPC pull (bench/gpu/crossgpu.py;
# needs no vLLM; on a one-GPU machine both processes share GPU 0)
if [ "${CROSS:-0}" = 1 ]; then
  say "bench/gpu/crossgpu.py"
  timeout -k 10 "${CROSS_BUDGET_S:-150}" "$PY" -m bench.gpu.crossgpu --out "$OUT/gpu-crossgpu.json"
  say "RESULT crossgpu rc=$?"
fi

# -- 6b. optional: the CUDA KV path's round trip and its time by stage (image packages only)
if [ "${KVPATH_TOOLS:-0}" = 1 ]; then
  timeout -k 10 90 "$PY" tools/gpu/kvpath-smoke.py; say "RESULT kvpath-smoke rc=$?"
  timeout -k 10 120 "$PY" tools/gpu/kvpath-profile.py; say "RESULT kvpath-profile rc=$?"
fi

# -- 6c. optional: the save overlapped with the forward (kvstore/gpu_layerwise.py): its bytes and
# checksums against the whole-chunk save's on this GPU, then the prefill step with either save
# (bench/gpu/overlap.py: $OUT/gpu-overlap.json; image packages + redis-py only)
if [ "${OVERLAP:-0}" = 1 ]; then
  say "layer-wise save: tests/gpu/test_layerwise_gpu.py, bench/gpu/overlap.py"
  timeout -k 10 150 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_layerwise_gpu.py
  say "RESULT layerwise check rc=$?"
  # shellcheck disable=SC2086
  timeout -k 10 "${OVERLAP_BUDGET_S:-200}" "$PY" -m bench.gpu.overlap --out "$OUT/gpu-overlap.json" ${OVERLAP_ARGS:-}
  say "RESULT overlap bench rc=$?"
fi

# -- 7. optional: pdserve 1P1D vs monolithic vLLM under load, on the same GPU. SERVE_BENCH_STREAMS
# ("channel serve") runs it once per router.decode_stream, one after the other in this call, each
# against its own monolithic run ($OUT/gpu-serve-<stream>.json); an item STREAM/TRANSPORT also sets
# router.serve_transport ($OUT/gpu-serve-<stream>-<transport>.json); unset: one run, $OUT/gpu-serve.json.
if [ "${SERVE_BENCH:-0}" = 1 ]; then
  rm -rf /tmp/pdgpu-bench/logs && mkdir -p /tmp/pdgpu-bench/logs/ray
  save_ray_logs /tmp/pdgpu-bench/logs/ray &
  local saver2=$!
  streams=${SERVE_BENCH_STREAMS:-default}
  set -- $streams; local nruns=$#
  for stream in $streams; do
    left=$(( ${CALL_BUDGET_S:-560} - ($(date +%s) - T0) - 40 ))
    budget=${SERVE_BENCH_BUDGET_S:-270}; [ "$left" -lt "$budget" ] && budget=$left
    if [ "$nruns" -gt 1 ] && [ $(( left / nruns )) -lt "$budget" ]; then budget=$(( left / nruns )); fi
    nruns=$(( nruns - 1 ))
    if [ "$budget" -lt 120 ]; then
      say "RESULT serve bench ($stream) skipped: ${budget}s left"; continue
    fi
    if [ "$stream" = default ]; then out=$OUT/gpu-serve.json; extra=""
    elif [ "${stream#*/}" != "$stream" ]; then  # STREAM/TRANSPORT: router.serve_transport too
      out=$OUT/gpu-serve-${stream%%/*}-${stream#*/}.json
      extra="--decode-stream ${stream%%/*} --serve-transport ${stream#*/}"
    else out=$OUT/gpu-serve-$stream.json; extra="--decode-stream $stream"; fi
    say "bench/gpu/serve.py $extra (budget ${budget}s)"
    # shellcheck disable=SC2086
    timeout -s INT -k 30 $(( budget + 20 )) "$PY" -m bench.gpu.serve --budget-s "$budget" \
      --out "$out" ${SERVE_BENCH_ARGS:-} $extra
    src=$?
    say "RESULT serve bench ($stream) rc=$src"
    [ "$src" = 0 ] || [ "$rc" != 0 ] || rc=$src
  done
  kill "$saver2" 2>/dev/null; wait "$saver2" 2>/dev/null
  grep -rhoE "reserved [0-9.]+ GiB memory for KV Cache|Available KV cache memory: [0-9.]+ GiB" \
    /tmp/pdgpu-bench/logs | sort | uniq -c
  tar -C /tmp/pdgpu-bench/logs -cJf "$OUT/gpu-serve-logs.tar.xz" . 2>/dev/null
fi
return "$rc"
}

main "$@" 2>&1 | tee -a "$OUT/gpu-tests.log"
exit "${PIPESTATUS[0]}"
