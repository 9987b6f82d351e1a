#!/bin/sh
# GPU smoke per release (tests/gpu/test_smoke.py, patched and vanilla trees): one call of the one
# GPU driver, `mla-seam suite --only smoke` (results in OUT_DIR/<tag>/<card>/, see results/README.md).
#   scripts/gpu_smoke.sh OUT_DIR VERSION [VERSION...]
out=${1:?usage: $0 OUT_DIR VERSION [VERSION...]}; shift; [ $# -ge 1 ] || { echo "usage: $0 OUT_DIR VERSION [VERSION...]" >&2; exit 2; }
for v in "$@"; do set -- "$@" --release "$v:none"; shift; done
PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m mla_seam suite --out "$out" --only smoke "$@"
