#!/usr/bin/env bash
# The tests that differ between stacks (marked compat in tests/conftest.py: kernels, compile,
# the compiled extension, models, checkpoints) on the oldest supported stack, the one the lent
# GPU machines run: Python 3.12, torch 2.11, Triton 3.6 (scripts/install.sh and CI's main run
# use torch 2.14.1 and Triton 3.8 on Python 3.11). Catches what only the older releases reject
# before a GPU lease is spent on it.
#   bash scripts/compat_check.sh                  -> ./.venv-compat, then pytest tests -q -m compat
#   bash scripts/compat_check.sh install          -> only ./.venv-compat
#   bash scripts/compat_check.sh test [ARGS...]   -> only the tests (ARGS go to pytest)
# PF_COMPAT_SPEC overrides the pins; PF_COMPAT_PYTHON the interpreter (Python 3.12: its
# extension file, _C.cpython-312-*.so, sits beside .venv's 3.11 one instead of replacing it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PF_COMPAT_VENV:-.venv-compat}"
# Triton 3.6's interpreter cannot run loops under NumPy >= 2.4 (pf_kernels/ops/_utils.py).
spec="${PF_COMPAT_SPEC:-torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy<2.4}"
what="${1:-all}"
case "$what" in
  all | install | test) shift $(($# > 0 ? 1 : 0)) ;;
  *) echo "compat_check.sh: the first argument is install, test or nothing, got '$what'" >&2; exit 2 ;;
esac

find_python() {
  local cand
  for cand in "${PF_COMPAT_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  echo "compat_check.sh: no Python 3.12 found (set PF_COMPAT_PYTHON)" >&2
  return 1
}

py="$venv/bin/python"
if [ "$what" != test ]; then
  # scripts/install.sh with another interpreter and torch; the later installs keep these
  # pins (pip leaves a satisfied requirement alone).
  python="$(find_python)"
  PF_VENV="$venv" PF_PYTHON="$python" PF_TORCH_SPEC="$spec" bash scripts/install.sh
  "$py" -c "import sys, torch, triton, numpy, pf_kernels._C as C; print(f'compat: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, CUDA op built: {C.with_cuda}')"
fi
if [ "$what" != install ]; then
  if [ ! -x "$py" ]; then
    echo "compat_check.sh: no $venv (run: bash scripts/compat_check.sh install)" >&2
    exit 1
  fi
  "$py" -m pytest tests -q -m compat "$@"
fi
