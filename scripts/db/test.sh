#!/usr/bin/env bash
# `make db-test`: studies shared through a real PostgreSQL server on this machine.
#
#   1. installs Debian's postgresql when its binaries are missing (needs root; no service is
#      started by the install, no systemd needed),
#   2. starts a server on 127.0.0.1 with its own data directory in a temp dir (up.sh),
#   3. runs tests/db (several sweepers on one study, a sweeper killed, the server restarted
#      mid-sweep or gone for good, credentials kept out of files, logs and tables; the
#      concurrency cases on sqlite too),
#   4. stops the server by its process id, whatever happened (down.sh), and removes the dir.
#
# Extra arguments go to pytest; PYTHON picks the interpreter (make test-next: .venv-next).
# KEEP_DB_STATE=1 keeps the temp dir (server log) for debugging.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && [ -z "${RLD_PG_BIN:-}" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "db-test: PostgreSQL missing and not root: apt-get install -y postgresql" >&2
        exit 1
    fi
    echo "db-test: installing postgresql"
    # keep the package's own cluster from being started as a service during the install
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql \
        || { [ "$made_policy" = 1 ] && rm -f "$policy"; exit 1; }
    [ "$made_policy" = 1 ] && rm -f "$policy"
fi

STATE=$(mktemp -d "${TMPDIR:-/tmp}/rld-db.XXXXXX")
cleanup() {
    rc=$?
    bash scripts/db/down.sh "$STATE"
    if [ "$rc" != 0 ]; then
        echo "db-test: failed ($rc); server log:" >&2
        tail -n 30 "$STATE/log/postgres.log" >&2 2>/dev/null || true
    fi
    if [ "${KEEP_DB_STATE:-0}" = 1 ]; then echo "db-test: state kept in $STATE"; else rm -rf "$STATE"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash scripts/db/up.sh "$STATE" > "$STATE/env"
# shellcheck disable=SC1091
source "$STATE/env"
echo "db-test: PostgreSQL up on 127.0.0.1:$(cat "$STATE/port") ($STATE)"
"$PY" -m pytest tests/db -m db -p no:cacheprovider -v -s --durations=0 "$@"
