#!/bin/sh
# Set-up for the export checks (called from .ci/run): Debian's chromium renders the HTML report
# headless in tests/export/test_browser.py. Without it that test is skipped (exit 77).
set -e
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
