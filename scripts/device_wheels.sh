#!/usr/bin/env bash
# Make the wheel folder that scripts/gpu_check.sh installs on the lent GPU machine, which has
# no network. Its image already holds torch, triton, numpy, scipy, scikit-learn, einops,
# safetensors, tqdm, pillow, pybind11, ninja, pytest, pytest-benchmark and pytest-xdist
# (/work/.library/device/KINDS.md); it lacks hydra, omegaconf (and hydra's antlr4 runtime),
# torch-fidelity, and diffusers with importlib_metadata (benchmarks/bench_diffusers.py; the rest
# of diffusers' needs are there). All are pure Python, so wheels built here install there.
#   bash scripts/device_wheels.sh [DIR]      (default .whl, ignored by git)
# Versions are the ones this checkout's .venv resolved (scripts/install.sh), so the GPU run
# imports what CI tested; without a .venv, the pins below.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py=.venv/bin/python
[ -x "$py" ] || py=python3

# hydra-core 1.3 needs antlr4-python3-runtime 4.9.*, published as a source archive only:
# `pip wheel` builds it into a py3-none-any wheel.
spec=$("$py" - <<'PY'
from importlib.metadata import PackageNotFoundError, version

fallback = {"hydra-core": "1.3.2", "omegaconf": "2.3.0", "antlr4-python3-runtime": "4.9.3", "torch-fidelity": "0.3.0",
            "diffusers": "0.42.1", "importlib_metadata": "10.2.0"}
pins = []
for name, pin in fallback.items():
    try:
        pin = version(name)
    except PackageNotFoundError:
        pass
    pins.append(f"{name}=={pin}")
print(" ".join(pins))
PY
)
rm -rf "$dir"
mkdir -p "$dir"
# shellcheck disable=SC2086
python3 -m pip wheel -q --no-deps -w "$dir" $spec
for whl in "$dir"/*.whl; do
  case "$whl" in *-py3-none-any.whl | *-py2.py3-none-any.whl) ;; *) echo "not pure Python: $whl" >&2; exit 1 ;; esac
done
ls -1 "$dir"
echo "carry '$dir' in the device call; gpu_check.sh installs it: bash scripts/gpu_check.sh \$OUT $dir"
