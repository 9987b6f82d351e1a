#!/bin/sh
# Issue 8's measurements per release (PHASES bench: THD sweep, kernel counts, local vs TE; parity:
# HF parity), patched and vanilla: one call of the one GPU driver, `mla-seam suite --only UNITS`
# (results and the tables in OUT/<tag>/<card>/results.md, see results/README.md).
#   tests/gpu/run_issue8.sh OUT PHASES VERSION...      PHASES: bench | parity | bench,parity
out=${1:?usage: $0 OUT PHASES VERSION...}; phases=${2:?usage: $0 OUT PHASES VERSION...}; shift 2
[ $# -ge 1 ] || { echo "usage: $0 OUT PHASES VERSION..." >&2; exit 2; }
units=$(echo "$phases" | sed 's/bench/thd-sweep,kernels,local-vs-te/')
for v in "$@"; do set -- "$@" --release "$v:none"; shift; done
PYTHONPATH="$(cd "$(dirname "$0")/../../scripts" && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m mla_seam suite --out "$out" --only "$units" "$@"
