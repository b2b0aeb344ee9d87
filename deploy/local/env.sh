# Sourced by demo.sh and test.sh: a virtualenv with usagepipe, and the local servers up.
# Usage: source deploy/local/env.sh EXTRAS   (EXTRAS: "local" for the demo, "dev" for tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

need_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    echo python3; return 0
  fi
  echo "usagepipe needs Python >= 3.11 with venv; install it (Debian: apt-get install python3-venv)" >&2
  return 1
}

# Headless Chromium for the dashboard's browser test (tests/insights/test_browser.py):
# Debian's, which Playwright drives through its executable path (no browser download).
if [ "$1" = dev ] && ! command -v chromium >/dev/null 2>&1 &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

# Debian's Prometheus (with promtool) for the alert rules' and dashboards' tests
# (tests/deploy/test_observability.py), which run the binary themselves on a private
# port. The package's service (on 9090) is never started: a policy-rc.d that refuses
# every start is put in place for the install where the host has none (containers
# usually do), and removed after.
if [ "$1" = dev ] && ! command -v promtool >/dev/null 2>&1 &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
  [ -z "$policy" ] || rm -f "$policy"
fi

if [ ! -x .venv/bin/python ]; then
  "$(need_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"
.venv/bin/usagepipe --log-level WARNING services up
