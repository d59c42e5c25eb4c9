#!/usr/bin/env bash
# Installs what actsim needs on Debian 12 (only the packages that are missing), then configures
# and builds it (Release) in ./build. Used by quickstart.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(build-essential cmake ninja-build pkg-config libboost-graph-dev libboost-program-options-dev libfmt-dev
      catch2 libtomlplusplus-dev nlohmann-json3-dev)
# Tests only: real PyTorch (CPU) for the byte-exact cross-check, Chromium for the report check.
if [ "${1:-}" = "--tests" ]; then pkgs+=(python3 python3-torch chromium); fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The CUDA toolkit (optional) lives in the conventional location; CMake finds nvcc on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build
