#!/usr/bin/env bash
# Install what the dashboard's browser tests drive: Debian's headless Chromium and its chromedriver
# (/usr/bin/chromium, /usr/bin/chromedriver). Idempotent and quiet; needs root (make test runs it).
set -euo pipefail
exec </dev/null
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup-browser: must run as root to install chromium and chromium-driver" >&2
  exit 1
fi
apt-get update -q >/dev/null
apt-get install -y -q chromium chromium-driver >/dev/null
echo "setup-browser: installed $(/usr/bin/chromium --version)"
