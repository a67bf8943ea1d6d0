#!/usr/bin/env bash
# Services the test suite talks to over real connections: PostgreSQL (the SQL helper runs against
# it as well as SQLite). Started when installed but stopped; installed with apt when missing.
set -euo pipefail

pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "test-services: installing postgresql"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "test-services: PostgreSQL is not running on 127.0.0.1:5432 and cannot be installed" >&2
      exit 1
    fi
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  echo "test-services: starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
# The tests use database `test` as role postgres over TCP; create it if this server lacks it.
if command -v psql >/dev/null && [ "$(id -u)" = 0 ]; then
  su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='test'\"" 2>/dev/null | grep -q 1 \
    || su postgres -c "createdb test" 2>/dev/null || true
fi
