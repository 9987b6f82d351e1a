#!/usr/bin/env bash
# Nightly drift job: is every upstream release (and upstream main) still served by a series and
# handled by the adapter? Not part of .ci/run (it needs upstream tags and, for phase 2, a GPU).
#
#   ci/nightly-drift.sh                 phase 1 (CPU): drift report into $OUT, exit 17 on drift
#   GPU=1 ci/nightly-drift.sh           phase 1, then phase 2: the GPU suite on the newest release
#                                       of every line (a CUDA runner with Transformer Engine)
#
# Environment:
#   MEGATRON_DIR  a Megatron-LM clone (its tags are fetched first, and `main` joins the sweep);
#                 unset: a checkout is materialized from the PyPI sdists of every known release
#   TAGS          the range to sweep (default 0.13..main with MEGATRON_DIR, 0.13..0.19 without)
#   OUT           output folder (default ci-out/drift)
#   MLA_SEAM_CACHE  cache of sdists and checkouts (keep it between nights: sweeps then need no
#                 network and take < 2 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv test
seam() { "$MLA_SEAM_VENV/bin/mla-seam" "$@"; }

OUT=${OUT:-ci-out/drift}
rm -rf "$OUT" && mkdir -p "$OUT"

if [ -n "${MEGATRON_DIR:-}" ]; then
  git -C "$MEGATRON_DIR" fetch --quiet --tags origin
  git -C "$MEGATRON_DIR" fetch --quiet origin main:refs/heads/mla-seam-nightly-main || true
  TAGS=${TAGS:-0.13..mla-seam-nightly-main}
  megatron=$MEGATRON_DIR
else
  releases=$(seam upstream list | awk '{print $1}')
  # shellcheck disable=SC2086  # one argument per release
  megatron=$(seam upstream get --into "$OUT/megatron" $releases)
  TAGS=${TAGS:-0.13..0.19}
fi

# Phase 1 (CPU): per-patch classes, contract probes, adapter verdict per tag.
status=0
seam drift --megatron "$megatron" --tags "$TAGS" --baseline 0.16 --out "$OUT" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 17 ]; then
  echo "nightly-drift: the sweep itself failed (exit $status)" >&2
  exit "$status"
fi

# Phase 2 (GPU runner only): the suite on the newest release of every line, results into $OUT.
if [ "${GPU:-0}" = 1 ]; then
  for line in $(seam upstream list | awk '{print $1}' | cut -d. -f1,2 | sort -uV); do
    patched="$OUT/trees/$line/patched" vanilla="$OUT/trees/$line/vanilla"
    seam upstream get --into "$patched" "$line" >/dev/null
    seam upstream get --into "$vanilla" "$line" >/dev/null
    seam apply "$patched"
    seam suite --megatron "$patched" --baseline-megatron "$vanilla" --out "$OUT/results" || status=$?
  done
fi

echo "nightly-drift: report in $OUT (drift.md, drift.json, drift.png); exit $status" >&2
exit "$status"
