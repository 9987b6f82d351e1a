# Shared by scripts/*.sh (POSIX sh, sourced): make sure the repo's .venv has mla-seam installed.
#
#   ensure_venv            the CLI only (GitPython, rich)
#   ensure_venv runtime    plus what importing megatron.core needs (CPU torch, triton, einops),
#                          for the adapter summary of the main job
#   ensure_venv test       plus the test extras
#
# Sets MLA_SEAM_PY to the venv's python. Installs only what is missing, so repeated runs are fast.

MLA_SEAM_HOME=$(cd "$(dirname "$0")/.." && pwd)
MLA_SEAM_VENV=${MLA_SEAM_VENV:-$MLA_SEAM_HOME/.venv}
MLA_SEAM_PY=$MLA_SEAM_VENV/bin/python
# torch 2.13.0 is the CPU build this project tests with; PyPI's default build is CUDA (GBs).
MLA_SEAM_TORCH=${MLA_SEAM_TORCH:-torch==2.13.0}

ensure_venv() {
  if [ ! -x "$MLA_SEAM_PY" ]; then
    python3 -m venv "$MLA_SEAM_VENV" || {
      echo "mla-seam: cannot create $MLA_SEAM_VENV (python3 -m venv failed); install python3-venv" >&2
      return 1
    }
  fi
  if ! "$MLA_SEAM_PY" -c 'import mla_seam, git' 2>/dev/null; then
    "$MLA_SEAM_PY" -m pip install -q --disable-pip-version-check -e "$MLA_SEAM_HOME" >&2 || return 1
  fi
  case "${1:-}" in
    runtime) _ensure_modules 'torch, triton, einops, numpy' "$MLA_SEAM_TORCH" triton einops numpy ;;
    test) _ensure_modules 'torch, triton, einops, pytest, jsonschema, black, matplotlib' \
      "$MLA_SEAM_TORCH" triton -e "$MLA_SEAM_HOME[test,plot]" ;;
  esac
}

# _ensure_modules 'mod, mod' PIP_ARGS...: pip install PIP_ARGS unless every module imports.
_ensure_modules() {
  _modules=$1; shift
  if ! "$MLA_SEAM_PY" -c "import $_modules" 2>/dev/null; then
    echo "mla-seam: installing $* into $MLA_SEAM_VENV (first run only)" >&2
    "$MLA_SEAM_PY" -m pip install -q --disable-pip-version-check "$@" >&2 || return 1
  fi
}
