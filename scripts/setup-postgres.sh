#!/usr/bin/env bash
# PostgreSQL's server from Debian's packages, for the tests of the PostgreSQL records (tests/pg_server.py starts
# its own server per test session, in a temporary folder: no cluster is made or started here).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# no "main" cluster: the package would otherwise make one (and try to start it)
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/opbox-no-main.conf >/dev/null
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb
