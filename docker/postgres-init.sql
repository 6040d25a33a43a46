-- The MLflow server's second database: its users and permissions (docker/mlflow-server.sh).
CREATE DATABASE mlflow_auth;
