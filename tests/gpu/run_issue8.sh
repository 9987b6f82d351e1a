#!/bin/bash
# Issue 8 on the GPU machine: for each release, a vanilla and a patched tree, then
#   phase bench : tests/gpu/bench_issue8.py (THD sweep, kernel counts, local vs TE), patched then
#                 vanilla, one process each, one at a time per GPU;
#   phase parity: tests/gpu/test_parity.py (HF parity at input RMS 1 and 3), patched and vanilla;
# and the tables (python -m mla_seam.perf_tables) over every record written so far.
#
#   tests/gpu/run_issue8.sh OUT PHASES VERSION...      PHASES: bench | parity | bench,parity
#
# Needs the device kit sourced first (TE on PYTHONPATH) and the sdists in .device/sdist (the kit's
# stage.sh). Releases are spread over the visible GPUs (CUDA_VISIBLE_DEVICES per release, trees
# of one release run one after the other on their GPU). Writes under OUT: <side>-<version>-
# <phase>.jsonl records, logs, junit files, env.json and tables.md.
set -u
[ $# -ge 3 ] || { echo "usage: $0 OUT PHASES VERSION..." >&2; exit 2; }
out=$1; phases=$2; shift 2
here=$(cd "$(dirname "$0")/../.." && pwd)
work=${MLA_SEAM_WORK:-/tmp/mla-seam-issue8}
export MLA_SEAM_CACHE=${MLA_SEAM_CACHE:-/tmp/mla-seam-cache}
export PYTHONPATH="$here/scripts${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out" "$work" "$MLA_SEAM_CACHE/sdists"
cp -n "$here"/.device/sdist/*.tar.gz "$MLA_SEAM_CACHE/sdists/" 2>/dev/null || true
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
[ "$gpus" -ge 1 ] || { echo "no GPU visible" >&2; exit 18; }
python3 -c 'import json, torch, transformer_engine as te; print(json.dumps({"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "te": te.__version__}))' >"$out/env.json"

prepare() {  # prepare VERSION: vanilla and patched trees (idempotent)
  local v=$1
  [ -d "$work/vanilla-$v" ] || python3 -m mla_seam upstream get "$v" --into "$work/vanilla-$v" >/dev/null
  if [ ! -d "$work/patched-$v" ]; then
    python3 -m mla_seam upstream get "$v" --into "$work/patched-$v" >/dev/null
    python3 -m mla_seam apply "$work/patched-$v" >"$out/apply-$v.log" 2>&1
  fi
}

run_one() {  # run_one GPU VERSION SIDE PHASE FILE
  local gpu=$1 v=$2 side=$3 phase=$4 file=$5
  local tag="$side-$v-$phase"
  rm -f "$out/$tag.jsonl"
  CUDA_VISIBLE_DEVICES=$gpu MLA_SEAM_MEGATRON_TREE="$work/$side-$v" MLA_SEAM_SIDE=$side \
    MLA_SEAM_RESULTS="$out/$tag.jsonl" PYTHONUNBUFFERED=1 \
    python3 -m pytest "$here/tests/gpu/$file" -q -rs -p no:cacheprovider \
    --junitxml="$out/$tag.xml" >"$out/$tag.log" 2>&1
  echo "[$tag on GPU $gpu] $(tail -n 1 "$out/$tag.log")"
}

release() {  # release GPU VERSION: every phase, patched then vanilla, on one GPU
  local gpu=$1 v=$2
  prepare "$v" || { echo "[$v] tree preparation failed"; return 1; }
  for phase in ${phases//,/ }; do
    case $phase in
      bench) file=bench_issue8.py ;;
      parity) file=test_parity.py ;;
      *) echo "unknown phase $phase" >&2; return 2 ;;
    esac
    run_one "$gpu" "$v" patched "$phase" "$file"
    run_one "$gpu" "$v" vanilla "$phase" "$file"
  done
}

i=0
for v in "$@"; do
  release $((i % gpus)) "$v" &
  i=$((i + 1))
  if [ $((i % gpus)) -eq 0 ]; then wait; fi
done
wait
card=$(python3 -c 'import json, sys; e = json.load(open(sys.argv[1])); print("%s, torch %s, TE %s" % (e["gpu"], e["torch"], e["te"]))' "$out/env.json")
python3 -m mla_seam.perf_tables --card "$card" "$out"/*.jsonl >"$out/tables.md"
cat "$out/tables.md"
