#!/usr/bin/env bash
# Runs one action over several local services:   stack.sh start|stop|restart|status [SERVICE...]
# SERVICE is kafka, redis or mlflow (default: all three). Stop goes in reverse order, so a service
# is never left running without the ones started before it.
# Exit status: start/stop stop at the first failure; status is 0 only if all are running, else 3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { echo "usage: $0 start|stop|restart|status [kafka|redis|mlflow]..." >&2; exit 2; }

(($# >= 1)) || usage
action="$1"
shift
services=("$@")
((${#services[@]})) || services=(kafka redis mlflow)
for s in "${services[@]}"; do
    [[ "$s" == kafka || "$s" == redis || "$s" == mlflow ]] || { echo "stack: unknown service '$s'" >&2; usage; }
done

reversed=()
for ((i = ${#services[@]} - 1; i >= 0; i--)); do reversed+=("${services[i]}"); done

case "$action" in
    start)
        for s in "${services[@]}"; do "$here/$s.sh" start; done
        ;;
    stop)
        for s in "${reversed[@]}"; do "$here/$s.sh" stop; done
        ;;
    restart)
        for s in "${reversed[@]}"; do "$here/$s.sh" stop; done
        for s in "${services[@]}"; do "$here/$s.sh" start; done
        ;;
    status)
        rc=0
        for s in "${services[@]}"; do "$here/$s.sh" status || rc=3; done
        exit "$rc"
        ;;
    *) usage ;;
esac
