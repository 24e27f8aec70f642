#!/usr/bin/env bash
# MLflow tracking server + model registry from the project's venv: sqlite metadata, local artifacts
# served through the server (mlflow-artifacts:/), on 127.0.0.1.   Usage: mlflow.sh start|stop|restart|status
set -euo pipefail

SVC=mlflow
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SVC_PORT="$SPECTUTOR_MLFLOW_PORT"
SVC_MATCH="mlflow server"

DATA="$STATE/mlflow"
MLFLOW_BIN="$VENV/bin/mlflow"

svc_prepare() {
    [[ -x "$MLFLOW_BIN" ]] || die "'$MLFLOW_BIN' not found; create the venv first (make venv) or set SPECTUTOR_VENV"
    mkdir -p "$DATA/artifacts"
    # The job runner (a huey consumer with 5 workers) serves GenAI evaluation and trace archival
    # jobs, which we don't use; on two cores it only competes with the models for CPU.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
}

svc_command() {
    # The registry needs a database store; sqlite is MLflow's own default since 3.7.
    # --allowed-hosts: the default host check covers localhost and private ranges; naming the
    # loopback forms explicitly keeps http://127.0.0.1:PORT working whatever that default becomes.
    # One worker: two cores, and sqlite serialises writes anyway.
    SVC_CMD=("$MLFLOW_BIN" server
        --backend-store-uri "sqlite:///$DATA/mlflow.db"
        --artifacts-destination "$DATA/artifacts"
        --host 127.0.0.1 --port "$SVC_PORT" --workers 1
        --allowed-hosts "127.0.0.1,127.0.0.1:$SVC_PORT,localhost,localhost:$SVC_PORT")
}

svc_ready() {
    local url="http://127.0.0.1:$SVC_PORT/health" body
    if command -v curl >/dev/null; then
        body="$(curl -fsS --max-time 3 "$url" 2>/dev/null)" || return 1
    else
        body="$("$VENV/bin/python" -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=3).read().decode())' "$url" 2>/dev/null)" || return 1
    fi
    [[ "$body" == "OK" ]]
}

svc_main "$@"
