#!/bin/sh
# The team's MLflow tracking server: runs in PostgreSQL, a login for every request (MLflow's
# basic-auth app), artifacts proxied by the server. docker/compose.yaml and
# cluster/mlflow-server.yaml start it; the tests start it on loopback. No password is shipped:
#   MLFLOW_DB_URI                    postgresql://USER:PASSWORD@HOST:5432/mlflow       the runs
#   MLFLOW_AUTH_DB_URI               postgresql://USER:PASSWORD@HOST:5432/mlflow_auth  the users
#   MLFLOW_AUTH_ADMIN_PASSWORD       the `admin` account's password (12 characters or more), set once
#   MLFLOW_FLASK_SERVER_SECRET_KEY   signs the UI's forms (any long random string)
#   MLFLOW_ARTIFACTS                 where artifacts go (default /data/artifacts; s3://... on a cluster)
#   MLFLOW_HOST, MLFLOW_PORT         default 0.0.0.0 and 5000
# Extra arguments go to `mlflow server` (e.g. --allowed-hosts).
set -eu
: "${MLFLOW_DB_URI:?set MLFLOW_DB_URI}" "${MLFLOW_AUTH_DB_URI:?set MLFLOW_AUTH_DB_URI}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
ini=$(mktemp)
# a login checked once a minute per worker, not hashed again on every request (PBKDF2: 230 ms a
# log_batch without the cache, jobs/bench_tracking.py)
printf '[mlflow]\ndefault_permission = EDIT\ndatabase_uri = %s\nadmin_username = admin\nauth_cache_ttl_seconds = 60\n' \
  "$MLFLOW_AUTH_DB_URI" > "$ini"
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server --app-name basic-auth --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "$MLFLOW_DB_URI" --artifacts-destination "${MLFLOW_ARTIFACTS:-/data/artifacts}" "$@"
