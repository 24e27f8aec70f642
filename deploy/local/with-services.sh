#!/usr/bin/env bash
# Runs a command with local services up, then puts things back as they were:
#   with-services.sh SERVICE... -- CMD [ARGS...]
# Starts each SERVICE (kafka, redis, mlflow), exports the client variables from env.sh
# (SPECTUTOR_KAFKA_BOOTSTRAP, SPECTUTOR_REDIS_URL, MLFLOW_TRACKING_URI), runs CMD, and on exit
# (CMD's success, failure, or an interrupt) stops only the services it started itself, so a
# developer's already-running stack survives. Exits with CMD's status.
# WITH_SERVICES_KEEP="mlflow ..." leaves those running after CMD succeeds (the demo's MLflow UI);
# after a failure or an interrupt everything it started is stopped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { echo "usage: $0 SERVICE... -- CMD [ARGS...]   (SERVICE: kafka, redis, mlflow)" >&2; exit 2; }

services=()
while (($#)) && [[ "$1" != "--" ]]; do
    [[ "$1" == kafka || "$1" == redis || "$1" == mlflow ]] || { echo "with-services: unknown service '$1'" >&2; usage; }
    services+=("$1")
    shift
done
(($# >= 2)) || usage # "--" and at least the command
shift

# shellcheck source=env.sh
. "$here/env.sh"

started=()
# shellcheck disable=SC2317 # invoked by the EXIT trap.
cleanup() {
    local rc=$? i
    # Reverse start order; a failed stop must not hide CMD's status, so errors are only reported.
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        if ((rc == 0)) && [[ " ${WITH_SERVICES_KEEP:-} " == *" ${started[i]} "* ]]; then
            echo "with-services: leaving ${started[i]} running (WITH_SERVICES_KEEP)"
            continue
        fi
        "$here/${started[i]}.sh" stop || echo "with-services: stopping ${started[i]} failed" >&2
    done
    exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs (bash skips it on an untrapped signal).
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

for s in "${services[@]}"; do
    if "$here/$s.sh" status >/dev/null; then
        echo "with-services: $s already running; leaving it running afterwards"
        continue
    fi
    # Recorded before starting: a start that fails half-way may leave a process behind to stop.
    started+=("$s")
    "$here/$s.sh" start
done

echo "with-services: running: $*"
set +e
"$@"
rc=$?
set -e
echo "with-services: command exited with status $rc"
exit "$rc"
