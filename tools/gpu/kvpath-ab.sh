#!/usr/bin/env bash
# The KV path benchmark, this tree against a base revision's KV path, alternated in one call on
# one machine (the save's ratio moves by up to 0.17 between machines and calls: only runs side by
# side in one call compare two versions).
#
#   here:        bash tools/gpu/kvpath-ab.sh stage <rev>      # .whl-gpu/base/: <rev>'s kvstore/gpu_*.py
#   device call: carry [".whl-gpu/extra", ".whl-gpu/base"]
#                bash tools/gpu/kvpath-ab.sh run [ROUNDS=3] [kvpath args...]
#   or, this tree alone in ROUNDS processes one after the other (whole processes run slow or
#   fast together: one run says little), carry [".whl-gpu/extra"]:
#                bash tools/gpu/kvpath-ab.sh repeat [ROUNDS=4] [kvpath args...]
#
# `run` unpacks the extra part (redis-py) if no earlier step did, copies the tree to /tmp/pdbase
# with the base's files in kvstore/, then runs `python3 -m bench.gpu.kvpath` ROUNDS times from
# each, this tree first; JSON to $RES/kvpath-{new,base}-N.json (RES: default $OUT), tables to
# stdout, and at the end each run's per-request save and load ratio at every size.
set -euo pipefail
cmd=${1:-}; shift || true

if [ "$cmd" = stage ]; then
  rev=${1:?usage: kvpath-ab.sh stage <rev>}
  rm -rf .whl-gpu/base && mkdir -p .whl-gpu/base
  for f in $(git ls-tree --name-only "$rev" kvstore/ | grep -E '^kvstore/gpu_[a-z0-9_]+\.py$'); do
    git show "$rev:$f" > ".whl-gpu/base/$(basename "$f")"
  done
  git rev-parse "$rev" > .whl-gpu/base/REV
  ls .whl-gpu/base
  exit 0
fi

case "$cmd" in run) sides="new base" ;; repeat) sides="new" ;;
  *) echo "usage: kvpath-ab.sh stage <rev> | run [ROUNDS] [kvpath args] | repeat [ROUNDS] [kvpath args]"; exit 2 ;;
esac
rounds=${1:-3}; shift || true
RES=${RES:-${OUT:-/tmp/pdab}}; mkdir -p "$RES"
if [ ! -d /tmp/pdextra/site ]; then
  mkdir -p /tmp/pdextra && xz -dc .whl-gpu/extra/extra.tar.xz | tar -xf - -C /tmp/pdextra
fi
if [ "$cmd" = run ]; then
  [ -f .whl-gpu/base/REV ] || { echo "carry .whl-gpu/base (kvpath-ab.sh stage <rev>)"; exit 3; }
  rm -rf /tmp/pdbase && mkdir -p /tmp/pdbase
  cp -r bench kvstore cluster router prefill_worker decode_worker /tmp/pdbase/
  cp .whl-gpu/base/gpu_*.py /tmp/pdbase/kvstore/
  echo "base: $(cat .whl-gpu/base/REV)"
fi
for i in $(seq "$rounds"); do
  for side in $sides; do
    dir=$PWD; [ "$side" = base ] && dir=/tmp/pdbase
    echo "== $side $i"
    (cd "$dir" && PYTHONPATH="$dir:/tmp/pdextra/site" timeout -k 10 150 python3 -m bench.gpu.kvpath \
      --out "$RES/kvpath-$side-$i.json" "$@" 2>&1 | grep -vE "Warning|warn\(")
  done
done
python3 - "$RES" "$rounds" $sides <<'EOF'
import json, sys
res, rounds, sides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("per request, save / load vs pinned: the median call (the 10th percentile of per-round ratios)"
      " [behind the GPU work: save / load; the slots' D2H alone]")
for side in sides:
    for i in range(1, rounds + 1):
        try:
            rows = json.load(open(f"{res}/kvpath-{side}-{i}.json"))["rows"]
        except (OSError, ValueError) as e:
            print(f"{side} {i}: no result ({e})")
            continue
        cells = [f"{r['chunk_bytes'] >> 10}K {r['req_save_vs_pinned']:.3f}/{r['req_load_vs_pinned']:.3f}"
                 f" (p10 {r.get('req_save_vs_pinned_p10', 0):.2f}/{r.get('req_load_vs_pinned_p10', 0):.2f})"
                 + (f" [{r['req_save_behind_vs_pinned']:.3f}/{r['req_load_behind_vs_pinned']:.3f};"
                    f" {r.get('req_slots_d2h_vs_pinned', 0):.3f}]" if "req_save_behind_vs_pinned" in r else "")
                 for r in rows if "req_save_vs_pinned" in r]
        print(f"{side} {i}: " + "  ".join(cells))
EOF
