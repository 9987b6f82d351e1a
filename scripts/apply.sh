#!/bin/sh
# Thin wrapper around `mla-seam apply`:
#   scripts/apply.sh [--check|--status|--revert] [--series LINE] [MEGATRON_DIR]
# Makes sure mla-seam is installed in <repo>/.venv (lib.sh: `python3 -m venv` if missing,
# `pip install -e .` if the package is not importable there), then hands over to it. Without
# MEGATRON_DIR, apply materializes the default release into ./megatron-lm and applies to it.
set -eu
. "$(dirname "$0")/lib.sh"

# The main job (no MEGATRON_DIR) ends with the adapter summary, which imports megatron.core.
want=runtime
expect_value=no
for arg in "$@"; do
  if [ "$expect_value" = yes ]; then expect_value=no; continue; fi
  case "$arg" in
    --series) expect_value=yes ;;
    -h|--help) want= ;;
    -*) ;;
    *) want= ;;
  esac
done
ensure_venv $want
exec "$MLA_SEAM_VENV/bin/mla-seam" apply "$@"
