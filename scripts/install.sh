#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment with PyTorch, then this
# package with its compiled LTG extension and the dev/eval extras.
#   bash scripts/install.sh            -> ./.venv
#   PF_VENV=/path bash scripts/install.sh
#   PF_PYTHON=python3.12 bash scripts/install.sh   (the interpreter the venv is made from)
# On a machine with a GPU, install the torch build that matches its driver first, or set
# PF_TORCH_SPEC (e.g. PF_TORCH_SPEC="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PF_VENV:-.venv}"
torch_spec="${PF_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$venv/bin/python" ]; then
  "${PF_PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
# torch first: the extension builds against it (no build isolation below).
# shellcheck disable=SC2086
"$py" -m pip install -q $torch_spec
"$py" -m pip install -q pybind11 ninja
# CUDA toolkit: build the CUDA LTG op too when nvcc is here (it compiles without a GPU).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-2}"
"$py" -m pip install -q --no-build-isolation -e '.[dev,eval,vae,repa,t2i,log]'
"$py" -c "import pf, pf_kernels; print('patch-forcing', pf.__version__, 'installed in $venv')"
