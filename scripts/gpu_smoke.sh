#!/bin/sh
# GPU smoke of the overlay, per release: materialize the release, apply the series, and run
# tests/gpu/test_smoke.py inside the patched tree on the visible GPU (real Transformer Engine).
#
#   scripts/gpu_smoke.sh OUT_DIR VERSION [VERSION...]
#
# Uses the python3 on PATH as it is (a CUDA host with torch and TE; GitPython importable) with
# scripts/ on PYTHONPATH, so it also runs where nothing can be installed. Writes per release
# smoke-<v>.jsonl (one record per case), junit-<v>.xml and log-<v>.txt, plus env.json.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR VERSION [VERSION...]" >&2; exit 2; }
out=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
work=${MLA_SEAM_WORK:-$(mktemp -d)}
mkdir -p "$out"
export PYTHONPATH="$here/scripts${PYTHONPATH:+:$PYTHONPATH}"
# TE prefers a system cuDNN over the one torch ships; two cuDNN versions in one process break
# both ("cuDNN version incompatibility", undefined symbols). Point TE at torch's own cuDNN.
# libcudnn loads its sub-libraries by soname, so torch's folder goes on LD_LIBRARY_PATH too.
if [ -z "${CUDNN_HOME:-}" ]; then
  if CUDNN_HOME=$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null)
  then
    export CUDNN_HOME LD_LIBRARY_PATH="$CUDNN_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    unset CUDNN_HOME
  fi
fi
python3 - "$out/env.json" <<'PY'
import json, sys, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
try:
    import transformer_engine
    info["transformer_engine"] = transformer_engine.__version__
except Exception as exc:  # noqa: BLE001
    info["transformer_engine"] = f"not importable: {exc}"
json.dump(info, open(sys.argv[1], "w"), indent=2, sort_keys=True)
print(json.dumps(info, sort_keys=True))
PY
status=0
for v in "$@"; do
  tree="$work/megatron-$v"
  python3 -m mla_seam upstream get "$v" --into "$tree" >/dev/null
  python3 -m mla_seam apply "$tree"
  rm -f "$out/smoke-$v.jsonl"
  MLA_SEAM_MEGATRON_TREE="$tree" MLA_SEAM_RESULTS="$out/smoke-$v.jsonl" PYTHONUNBUFFERED=1 \
    python3 -m pytest "$here/tests/gpu/test_smoke.py" -v -rs -p no:cacheprovider \
    --junitxml="$out/junit-$v.xml" >"$out/log-$v.txt" 2>&1 || status=1
  tail -n 25 "$out/log-$v.txt"
done
python3 "$here/scripts/smoke_report.py" "$out" >"$out/README.md"
exit $status
