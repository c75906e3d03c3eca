#!/usr/bin/env bash
# Local services for the Prefect UI path, all on loopback, logs under .alignflow/services/.
#   scripts/services.sh up     Prefect server :4200 (UI), MLflow server :5000, moto S3 :5001,
#                              deploys deployments/prefect.yaml, starts a process worker
#   scripts/services.sh down   stops them (the worker first: it hangs if its server goes first)
#   scripts/services.sh env    prints the variables that point a shell at them
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
DIR=$ROOT/.alignflow/services
POOL=alignflow-local
mkdir -p "$DIR"

export PREFECT_HOME=$DIR/prefect-home
export PREFECT_API_URL=http://127.0.0.1:4200/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local-secret}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:5001
export ALIGNFLOW_HOME=$ROOT

start() {  # name, command...: its own session, pid file, log file
  local name=$1; shift
  if [ -f "$DIR/$name.pid" ] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$DIR/$name.pid"))"; return
  fi
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
  echo "$name started (pid $!, log $DIR/$name.log)"
}

wait_http() {  # url, seconds
  for _ in $(seq 1 "$2"); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "not ready: $1" >&2; return 1
}

stop() {
  local name=$1
  [ -f "$DIR/$name.pid" ] || return 0
  local pid; pid=$(cat "$DIR/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/$name.pid"
  echo "$name stopped"
}

case "${1:-}" in
  up)
    start moto "$VENV/bin/python" -m moto.server -H 127.0.0.1 -p 5001
    wait_http http://127.0.0.1:5001/moto-api/ 30
    "$VENV/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:5001').create_bucket(Bucket='alignflow')"
    start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port 5000 \
      --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination s3://alignflow/mlflow-artifacts
    start prefect "$VENV/bin/prefect" server start --host 127.0.0.1 --port 4200
    wait_http http://127.0.0.1:4200/api/health 90
    "$VENV/bin/prefect" work-pool create "$POOL" --type process --overwrite >/dev/null
    "$VENV/bin/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml
    # Flow runs started by the worker track to the MLflow server and store artifacts in S3.
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 ALIGNFLOW_STORAGE_ROOT=s3://alignflow/store \
      AWS_ENDPOINT_URL_S3=http://127.0.0.1:5001 \
      start worker "$VENV/bin/prefect" worker start --pool "$POOL" --type process
    wait_http http://127.0.0.1:5000/health 60
    echo "Prefect UI: http://127.0.0.1:4200   MLflow UI: http://127.0.0.1:5000   S3: http://127.0.0.1:5001"
    ;;
  down)
    for name in worker prefect mlflow moto; do stop "$name"; done
    ;;
  env)
    echo "export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    echo "export ALIGNFLOW_STORAGE_ROOT=s3://alignflow/store AWS_ENDPOINT_URL_S3=http://127.0.0.1:5001"
    echo "export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:5001 AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
    echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
    ;;
  *)
    echo "usage: $0 up|down|env" >&2; exit 2
    ;;
esac
