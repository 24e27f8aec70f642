# shellcheck shell=bash
# Where the local services live and how clients reach them. Source it (`. deploy/local/env.sh`);
# the service scripts do too, so a port override given once is seen by servers and clients alike.
# Only variables are set here: it is safe to source from an interactive shell or from `set -u` code.

# `~` rather than $HOME: tilde expansion still finds the home directory when HOME is unset.
# shellcheck disable=SC2116 # the echo is what makes `~` expand inside the quotes.
export SPECTUTOR_HOME="${SPECTUTOR_HOME:-$(echo ~)/.cache/spectutor}"
export SPECTUTOR_LOCAL_STATE="${SPECTUTOR_LOCAL_STATE:-$SPECTUTOR_HOME/local}"

export SPECTUTOR_KAFKA_PORT="${SPECTUTOR_KAFKA_PORT:-9092}"
export SPECTUTOR_KAFKA_CONTROLLER_PORT="${SPECTUTOR_KAFKA_CONTROLLER_PORT:-9093}"
export SPECTUTOR_REDIS_PORT="${SPECTUTOR_REDIS_PORT:-6379}"
export SPECTUTOR_MLFLOW_PORT="${SPECTUTOR_MLFLOW_PORT:-5000}"

# 127.0.0.1 rather than localhost: every service binds IPv4 loopback only, and "localhost" may
# resolve to ::1 first, which would cost each client a failed connect.
export SPECTUTOR_KAFKA_BOOTSTRAP="127.0.0.1:$SPECTUTOR_KAFKA_PORT"
export SPECTUTOR_REDIS_URL="redis://127.0.0.1:$SPECTUTOR_REDIS_PORT/0"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$SPECTUTOR_MLFLOW_PORT"
