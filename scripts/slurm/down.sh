#!/usr/bin/env bash
# Stop the daemons that scripts/slurm/up.sh started in STATE_DIR (by their process ids only).
set -uo pipefail
STATE=${1:?usage: down.sh STATE_DIR}
[ -d "$STATE" ] || exit 0
if [ -f "$STATE/slurm.conf" ] && command -v scancel >/dev/null; then
    SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
fi
# slurmd first (it kills its job steps), then the controller, then munge
for name in slurmd slurmctld munged; do
    f="$STATE/$name.pid.started"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$f"
done
exit 0
