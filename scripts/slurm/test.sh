#!/usr/bin/env bash
# `make slurm-test`: Slurm end to end on this machine.
#
#   1. installs slurm-wlm and munge from Debian when missing (needs root; no systemd needed),
#   2. starts munged, slurmctld and slurmd for a one-node cluster in a temp dir (up.sh),
#   3. runs tests/slurm (a 2x2 RLD grid through hydra/launcher=slurm + hparams=grid, jobs
#      requeued or signalled mid-run that resume from their checkpoints, and a 2-task job:
#      one data-parallel run over both tasks (gloo), requeued mid-run, that resumes),
#   4. stops the daemons it started, by their process ids, whatever happened (down.sh).
#
# Extra arguments go to pytest.  KEEP_SLURM_STATE=1 keeps the temp dir (logs) for debugging.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

missing=0
for exe in munged slurmctld slurmd sbatch scontrol; do
    command -v "$exe" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-test: slurm-wlm/munge missing and not root: apt-get install -y slurm-wlm munge" >&2
        exit 1
    fi
    echo "slurm-test: installing slurm-wlm and munge"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm-test: must run as root (slurmd starts jobs as their user)" >&2
    exit 1
fi

STATE=$(mktemp -d "${TMPDIR:-/tmp}/rld-slurm.XXXXXX")
cleanup() {
    rc=$?
    bash scripts/slurm/down.sh "$STATE"
    if [ "$rc" != 0 ]; then
        echo "slurm-test: failed ($rc); daemon logs:" >&2
        tail -n 30 "$STATE"/log/*.log >&2 2>/dev/null || true
    fi
    if [ "${KEEP_SLURM_STATE:-0}" = 1 ]; then echo "slurm-test: state kept in $STATE"; else rm -rf "$STATE"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash scripts/slurm/up.sh "$STATE" > "$STATE/env"
# shellcheck disable=SC1091
source "$STATE/env"
echo "slurm-test: cluster up ($SLURM_CONF)"
sinfo
"$PY" -m pytest tests/slurm -m slurm -p no:cacheprovider -v -s "$@"
