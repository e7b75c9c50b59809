#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
# Usage: bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive the system Chromium; without a CJK font, Chinese
# labels render as empty boxes in screenshots.
if ! command -v chromium >/dev/null 2>&1 || [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei >/dev/null
  else
    echo "tools/test.sh: install Chromium and a CJK font first: sudo apt-get install chromium fonts-wqy-microhei" >&2
  fi
fi

python -m pip install -q -r requirements-dev.txt -e .
exec python -m pytest "$@"
