#!/bin/sh
# Run the CPU test suite (the README's test command). Installs what it needs into .venv first.
#   scripts/test.sh [pytest args...]
set -eu
. "$(dirname "$0")/lib.sh"
ensure_venv test
cd "$MLA_SEAM_HOME"
exec "$MLA_SEAM_PY" -m pytest "$@"
