#!/usr/bin/env bash
# Install what is missing (PyTorch and Chromium too), build, and run the whole test suite, then
# the sanitizer build's tests and the fuzz smoke runs (scripts/sanitize.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
ctest --test-dir build --output-on-failure -j2
# The sanitizer job (ASan + UBSan unit and CLI tests) and the fuzz smoke runs (20 s per harness).
scripts/sanitize.sh
