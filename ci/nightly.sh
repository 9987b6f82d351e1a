#!/usr/bin/env bash
# The nightly drift job, end to end on this machine: the same steps as ci/nightly.yml.
#
#   ci/nightly.sh [--megatron CLONE --remote origin] [--pre] [--gpu auto|on|off] [--out DIR] ...
#
# Steps (python -m mla_seam.nightly --help has them all): discover new releases on the package
# index, fetch new tags and main from the clone's remote (without --megatron: every known release
# from the PyPI sdists), the drift sweep with the history file, a proposed series for each new
# release whose hooks all apply exactly or with offsets, the tracking issue's body for the rest,
# and the three-tree GPU suite for new or changed releases when a CUDA device is visible (else
# skipped, said so in the summary). Everything lands in --out (default ci-out/):
#   summary.md outcome.json drift/ proposals/ tracking-issue.md results/ history.jsonl
#
# Exit status: 0 nothing to do, 17 upstream drift found, 25 the overlay broke, 26 the job broke.
# Keep MLA_SEAM_CACHE (sdists, checkouts) and the history file between nights.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv test || exit 26
args=("$@")
case " ${args[*]} " in *" --out "*) ;; *) args+=(--out ci-out) ;; esac
"$MLA_SEAM_PY" -m mla_seam.nightly "${args[@]}"
