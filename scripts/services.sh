#!/usr/bin/env bash
# Local services for the Prefect UI path, all on loopback, logs under .alignflow/services/.
#   scripts/services.sh up     Prefect server :4200 (UI), MLflow server :5000, moto S3 :5001,
#                              deploys deployments/prefect.yaml, starts a process worker
#   scripts/services.sh down   cancels the runs in progress, then stops them (the worker first: it
#                              hangs if its server goes first)
#   scripts/services.sh env    prints everything `up` set, for a shell: eval "$(scripts/services.sh env)"
# ALIGNFLOW_SERVICES_DIR and ALIGNFLOW_{PREFECT,MLFLOW,S3}_PORT move them (a second set, a test).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
DIR=${ALIGNFLOW_SERVICES_DIR:-$ROOT/.alignflow/services}
PREFECT_PORT=${ALIGNFLOW_PREFECT_PORT:-4200} MLFLOW_PORT=${ALIGNFLOW_MLFLOW_PORT:-5000} S3_PORT=${ALIGNFLOW_S3_PORT:-5001}
POOL=alignflow-local
mkdir -p "$DIR"

# Everything the services, the CLI and the worker's flow runs see (flow runs track to the MLflow
# server and store artifacts in S3); `env` prints this list.
VARS="PREFECT_HOME PREFECT_API_URL PREFECT_SERVER_ANALYTICS_ENABLED MLFLOW_DISABLE_TELEMETRY DO_NOT_TRACK
  MLFLOW_TRACKING_URI ALIGNFLOW_STORAGE_ROOT AWS_ENDPOINT_URL_S3 MLFLOW_S3_ENDPOINT_URL
  AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION ALIGNFLOW_HOME"
export PREFECT_HOME=$DIR/prefect-home
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT ALIGNFLOW_STORAGE_ROOT=s3://alignflow/store
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local-secret}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export ALIGNFLOW_HOME=$ROOT

start() {  # name, command...: its own session, pid file, log file
  local name=$1; shift
  if [ -f "$DIR/$name.pid" ] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$DIR/$name.pid"))"; return
  fi
  # A background job of a script starts with SIGINT ignored; the worker stops on SIGTERM by sending
  # itself SIGINT, so it gets the default handler back (else it never stops and is killed hard).
  setsid env --default-signal=INT "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
  echo "$name started (pid $!, log $DIR/$name.log)"
}

wait_http() {  # url, seconds
  for _ in $(seq 1 "$2"); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "not ready: $1" >&2; return 1
}

stop() {  # name: SIGTERM its process group (a worker's flow runs too: they end Crashed), SIGKILL after 30 s
  local name=$1
  [ -f "$DIR/$name.pid" ] || return 0
  local pid; pid=$(cat "$DIR/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 -- "-$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name killed (still running 30 s after SIGTERM)"
  else
    echo "$name stopped"
  fi
  rm -f "$DIR/$name.pid"
}

cancel_runs() {  # the pool's runs in progress end Cancelled (the worker stops them), never left Running
  curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 || return 0
  POOL=$POOL "$VENV/bin/python" - <<'PY'
import os, time, httpx

api = httpx.Client(base_url=os.environ["PREFECT_API_URL"], timeout=10)
in_progress = {"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}},
               "work_pools": {"name": {"any_": [os.environ["POOL"]]}}}
for run in api.post("/flow_runs/filter", json=in_progress).json():
    api.post(f"/flow_runs/{run['id']}/set_state", json={"state": {
        "type": "CANCELLING", "name": "Cancelling", "message": "services.sh down"}, "force": True})
    print(f"cancelling flow run {run['name']}")
deadline = time.monotonic() + 60
while api.post("/flow_runs/filter", json=in_progress).json() and time.monotonic() < deadline:
    time.sleep(1)
PY
}

case "${1:-}" in
  up)
    start moto "$VENV/bin/python" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
    wait_http "$AWS_ENDPOINT_URL_S3/moto-api/" 30
    "$VENV/bin/python" -c "import boto3; boto3.client('s3').create_bucket(Bucket='alignflow')"
    start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination s3://alignflow/mlflow-artifacts
    start prefect "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
    wait_http "$PREFECT_API_URL/health" 90
    "$VENV/bin/prefect" work-pool create "$POOL" --type process --overwrite >/dev/null
    start worker "$VENV/bin/prefect" worker start --pool "$POOL" --type process
    "$VENV/bin/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$DIR/deploy.log" 2>&1 \
      || { cat "$DIR/deploy.log" >&2; exit 1; }
    echo "deployed deployments/prefect.yaml (log $DIR/deploy.log)"
    wait_http "$MLFLOW_TRACKING_URI/health" 60
    echo "Prefect UI: ${PREFECT_API_URL%/api}   MLflow UI: $MLFLOW_TRACKING_URI   S3: $AWS_ENDPOINT_URL_S3"
    ;;
  down)
    cancel_runs
    for name in worker prefect mlflow moto; do stop "$name"; done
    ;;
  env)
    for name in $VARS; do printf 'export %s=%q\n' "$name" "${!name}"; done
    ;;
  *)
    echo "usage: $0 up|down|env" >&2; exit 2
    ;;
esac
