#!/usr/bin/env bash
# Installs what actsim needs on Debian 12 (only the packages that are missing), then configures
# and builds it (Release) in ./build. Used by quickstart.sh and test.sh.
#
#   scripts/setup.sh            build dependencies (+ cuBLAS when nvcc is present), then build
#   scripts/setup.sh --tests    also what the checks need: Debian's python3-torch (1.13, the
#                               torch-cpu oracle), Chromium, and the virtual environment .venv with
#                               the pinned PyTorch 2.x CPU build (the torch2-cpu oracle)
#
# The virtual environment .venv (ignored by git) is made from the python3 on PATH (pyenv's 3.11
# here). Pinned versions, and why, are in the README's "Set-up" section.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pins. torch 2.13.0 is the CPU build that lies on this kind of machine's disk (pip takes it from
# there; an unpinned torch would pull a several-GB CUDA build). cuBLAS 13.0.x matches nvcc 13.0.
TORCH_PIN="torch==2.13.0"
NUMPY_PIN="numpy==2.4.1"
ACCELERATE_PIN="accelerate==1.15.0"
# transformers (the oracle of imported Hugging Face configs, tests/torch/test_against_hf.py) and the
# dependencies whose versions decide whether it imports with torch 2.13.0 and accelerate 1.15.0.
HF_PINS=("transformers==5.18.0" "huggingface_hub==2.4.0" "tokenizers==0.23.3" "safetensors==0.8.0")
# peft (the oracle of training.trainable = "lora") and the dependencies it pulls that are not pinned above.
PEFT_PINS=("peft==0.21.2" "psutil==7.2.2" "PyYAML==6.0.4" "tqdm==4.70.1" "packaging==26.4")
CUBLAS_PIN="nvidia-cublas==13.0.2.14"
VENV=.venv

tests=0
[ "${1:-}" = "--tests" ] && tests=1

pkgs=(build-essential cmake ninja-build pkg-config libboost-graph-dev libboost-program-options-dev libfmt-dev
      catch2 libtomlplusplus-dev nlohmann-json3-dev)
# Tests only: Debian's PyTorch 1.13 (CPU) for the torch-cpu cross-check, Chromium and a local d3 5
# (node-d3) for the browser checks of the report and of PyTorch's memory viewer.
if [ $tests = 1 ]; then pkgs+=(python3 python3-torch chromium fonts-dejavu-core node-d3); fi

source scripts/apt.sh
apt_install_missing setup "${pkgs[@]}"

# The CUDA toolkit (optional) lives in the conventional location; CMake finds nvcc on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# pip into .venv, only what is not installed at the pinned version yet.
venv_pip() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
  fi
  local want=()
  for spec in "$@"; do
    local name=${spec%%==*} version=${spec#*==}
    [ "$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')" = "$version" ] \
      || [ "$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: \([^+]*\).*/\1/p')" = "$version" ] \
      || want+=("$spec")
  done
  if [ ${#want[@]} -gt 0 ]; then
    echo "setup: pip install ${want[*]} into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${want[@]}"
  fi
}

# cuBLAS is not part of the toolkit on these machines: NVIDIA's wheel brings its headers and
# shared libraries (backends/cuda/CMakeLists.txt looks there when the toolkit has none).
cmake_args=()
if command -v nvcc >/dev/null 2>&1 && [ ! -e "$(dirname "$(dirname "$(command -v nvcc)")")/include/cublas_v2.h" ]; then
  venv_pip "$CUBLAS_PIN"
  cublas_root=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
  cmake_args+=("-DACTSIM_CUBLAS_ROOT=$cublas_root")
fi

if [ $tests = 1 ]; then
  venv_pip "$TORCH_PIN" "$NUMPY_PIN" "$ACCELERATE_PIN" "${HF_PINS[@]}" "${PEFT_PINS[@]}"
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" >/dev/null
cmake --build build
