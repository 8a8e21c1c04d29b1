#!/usr/bin/env bash
# Stop the PostgreSQL server that scripts/db/up.sh started in STATE_DIR, by its process id:
# SIGINT (a fast shutdown: clients are disconnected, the data is flushed), SIGQUIT after
# 30 s, SIGKILL after 10 s more.  The data stays: up.sh STATE_DIR starts the same server.
set -uo pipefail
STATE=${1:?usage: down.sh STATE_DIR}
f="$STATE/postgres.pid.started"
[ -f "$f" ] || exit 0
pid=$(cat "$f")
if kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -QUIT "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
fi
rm -f "$f"
exit 0
