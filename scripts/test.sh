#!/usr/bin/env bash
# Install what is missing (PyTorch and Chromium too), build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
ctest --test-dir build --output-on-failure -j2
