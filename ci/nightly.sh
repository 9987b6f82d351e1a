#!/usr/bin/env bash
# The nightly drift job on this machine: the phases of ci/nightly.yml, one after the other.
#
#   ci/nightly.sh [--megatron CLONE --remote origin] [--follow main,dev] [--pre]
#                 [--gpu auto|on|off|dry-run] [--out DIR] [--state DIR] [--publish ...]
#
# Phase all (python -m mla_seam.nightly --help has every option): the CPU phase (new releases
# on the package index, tags and the followed branches from the clone's remote, the drift sweep,
# a proposed series or a tracking-issue text per moving target) and the GPU phase (the proposed
# series staged on each changed target and the three-tree suite, when a CUDA device is visible;
# else skipped, said so). With --publish, also the publishing phases (proposal branches pushed
# to --project-remote, pull requests and issues through `gh`; add --github-dry-run to only
# record the GitHub calls in DIR/github-calls.jsonl). Everything lands in --out (default
# ci-out/); the state of earlier nights is kept in --state (default ci-state/).
#
# Exit status: 0 nothing to do, 17 upstream drift found, 25 the overlay broke, 26 the job broke.
# Installs mla-seam into .venv without torch (the CPU phase imports none).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv || exit 26
args=("$@")
case " ${args[*]} " in *" --out "*) ;; *) args+=(--out ci-out) ;; esac
case " ${args[*]} " in *" --state "* | *" --state-branch "*) ;; *) args+=(--state ci-state) ;; esac
"$MLA_SEAM_PY" -m mla_seam.nightly "${args[@]}"
