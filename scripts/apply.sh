#!/bin/sh
# Thin wrapper around `mla-seam apply`:
#   scripts/apply.sh [--check|--status|--revert] [--series LINE] [MEGATRON_DIR]
# Makes sure mla-seam is installed in <repo>/.venv (created with `python3 -m venv` if missing,
# `pip install -e .` if the package is not importable there), then hands over to it. Without
# MEGATRON_DIR, apply materializes the default release into ./megatron-lm and applies to it.
set -eu

repo=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
venv="$repo/.venv"

if [ ! -x "$venv/bin/python" ]; then
    echo "mla-seam: creating $venv" >&2
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import mla_seam' >/dev/null 2>&1 || [ ! -x "$venv/bin/mla-seam" ]; then
    echo "mla-seam: installing mla-seam into $venv" >&2
    "$venv/bin/python" -m pip install -q -e "$repo"
fi
exec "$venv/bin/mla-seam" apply "$@"
