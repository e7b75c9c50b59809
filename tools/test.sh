#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
# Usage: bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive the system Chromium; without a CJK font, Chinese
# labels render as empty boxes in screenshots. The cluster test puts two app
# processes behind an nginx it runs from a temporary directory of its own (it
# needs the binary only, not the system's nginx service).
if ! command -v chromium >/dev/null 2>&1 || [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] \
   || { ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; }; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    # No package may start its service while it installs (nginx's would take port 80, or fail where no init
    # runs and fail the install with it): policy-rc.d answers "not allowed", as in container images.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei nginx >/dev/null
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "tools/test.sh: install Chromium, a CJK font and nginx first: sudo apt-get install chromium fonts-wqy-microhei nginx" >&2
  fi
fi

python -m pip install -q -r requirements-dev.txt -e .
exec python -m pytest "$@"
