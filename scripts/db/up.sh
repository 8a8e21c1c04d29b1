#!/usr/bin/env bash
# Start a PostgreSQL server on this machine's loopback interface (CI and local checks).
#
#   source <(bash scripts/db/up.sh STATE_DIR)   # prints `export RLD_DB_STATE=STATE_DIR`
#   bash scripts/db/down.sh STATE_DIR           # stops what up.sh started (by process id)
#   bash scripts/db/up.sh STATE_DIR             # again: the same server, data and port
#
# Everything lives in STATE_DIR: the data directory (data/), the server's socket directory
# (socket/), its log (log/postgres.log), its port (port), the password of the role `rld`
# (password, readable by the caller only) and the server's process id (postgres.pid.started).
# The first call creates the cluster (initdb), a role `rld` (password login over TCP,
# scram-sha-256; may create databases) and its database `rld`; the superuser `postgres` logs
# in through the socket only.  The server runs in the foreground mode of `postgres` in the
# background of this shell (no systemd, no pg_ctlcluster), as the OS user `postgres` when run
# as root (created when missing).  Needs Debian's `postgresql` package (scripts/db/test.sh
# installs it when missing); RLD_PG_BIN names another bin directory.
set -euo pipefail

STATE=${1:?usage: up.sh STATE_DIR}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

BIN=${RLD_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
for exe in initdb postgres pg_isready psql; do
    [ -x "$BIN/$exe" ] || { echo "up.sh: $exe not found in '${BIN}' (apt-get install -y postgresql)" >&2; exit 1; }
done

# who runs the server: postgres (root may not), else the caller
if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    RUN_AS=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    OWNER=postgres
else
    RUN_AS=()
    OWNER=$(id -un)
fi

chmod 711 "$STATE"   # the server's user reaches its directories, lists nothing
mkdir -p "$STATE/log" "$STATE/socket"
chown "$OWNER" "$STATE/log" "$STATE/socket"
chmod 700 "$STATE/socket"

if [ ! -f "$STATE/port" ]; then
    # a free port on the loopback interface, outside the kernel's ephemeral range: a client
    # retrying a stopped server on an ephemeral port can draw that very port as its own and
    # connect to itself (TCP self-connect), then wait on its own packets and hold the port
    port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    read -r EPH_LO EPH_HI < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null \
        || { EPH_LO=32768; EPH_HI=60999; }
    ephemeral() { [ "$1" -ge "$EPH_LO" ] && [ "$1" -le "$EPH_HI" ]; }
    PORT=${RLD_PG_PORT:-25432}
    while ephemeral "$PORT" || ! port_free "$PORT"; do
        PORT=$((PORT + 1))
        [ "$PORT" -le 65535 ] || { echo "up.sh: no free port outside $EPH_LO-$EPH_HI" >&2; exit 1; }
    done
    echo "$PORT" > "$STATE/port"
fi
PORT=$(cat "$STATE/port")

if [ ! -f "$STATE/data/PG_VERSION" ]; then
    mkdir -p "$STATE/data"
    chown "$OWNER" "$STATE/data"
    chmod 700 "$STATE/data"
    "${RUN_AS[@]}" "$BIN/initdb" -D "$STATE/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --no-locale > "$STATE/log/initdb.log" 2>&1 \
        || { echo "up.sh: initdb failed, see $STATE/log/initdb.log" >&2; exit 1; }
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/password")
    NEW=1
fi

# the server, in the foreground mode, in the background of this shell: a simple command, so
# $! is the server itself (setpriv execs it), not a subshell
"${RUN_AS[@]}" "$BIN/postgres" -D "$STATE/data" -c listen_addresses=127.0.0.1 -c port="$PORT" \
    -c unix_socket_directories="$STATE/socket" -c logging_collector=off \
    < /dev/null >> "$STATE/log/postgres.log" 2>&1 &
echo $! > "$STATE/postgres.pid.started"

for _ in $(seq 150); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && break
    kill -0 "$(cat "$STATE/postgres.pid.started")" 2>/dev/null || break
    sleep 0.2
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" || {
    echo "up.sh: PostgreSQL did not start on 127.0.0.1:$PORT; its log:" >&2
    tail -n 20 "$STATE/log/postgres.log" >&2
    exit 1
}
PID=$(cat "$STATE/postgres.pid.started")
[ "$(head -n 1 "$STATE/data/postmaster.pid")" = "$PID" ] || {
    echo "up.sh: the server's pid is not $PID (see $STATE/data/postmaster.pid)" >&2; exit 1; }

if [ "${NEW:-0}" = 1 ]; then
    # the password goes to psql on stdin: never on a command line
    "$BIN/psql" -q -v ON_ERROR_STOP=1 -h "$STATE/socket" -p "$PORT" -U postgres -d postgres \
        > "$STATE/log/setup.log" 2>&1 <<SQL
CREATE ROLE rld LOGIN CREATEDB PASSWORD '$(cat "$STATE/password")';
CREATE DATABASE rld OWNER rld;
SQL
fi
echo "export RLD_DB_STATE=$STATE"
