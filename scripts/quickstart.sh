#!/usr/bin/env bash
# Quick start: install what is missing, build (Release), and simulate the seed model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
./build/tools/actsim simulate scenarios/seed-gpt2-xl.toml
