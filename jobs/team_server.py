"""A real PostgreSQL on loopback and the team's MLflow server on it (docker/mlflow-server.sh, the
script the compose file and the cluster manifest run): what tests/test_team_server.py and
jobs/bench_tracking.py start, and, run as a script, a team server to try without Docker:

    python jobs/team_server.py      # PostgreSQL's binaries on PATH or in /usr/lib/postgresql/*/bin
"""

import glob
import os
import secrets
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql; .ci/run does)")
    return found


class Postgres:
    """A throwaway PostgreSQL cluster in a directory of its own under the system's temporary
    directory (the `postgres` user cannot enter pytest's), listening on 127.0.0.1 only. As root
    it runs as `postgres`, which PostgreSQL requires."""

    USER = "mtml"

    def __init__(self):
        import tempfile

        self.root, self.port, self.password = tempfile.mkdtemp(prefix="mtml-postgres-"), free_port(), secrets.token_hex(12)
        self.data = os.path.join(self.root, "data")
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_owner, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def init(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        secret = os.path.join(self.root, "pw")
        with open(secret, "w") as f:
            f.write(self.password)
        if self.as_owner:
            shutil.chown(self.root, "postgres")
            shutil.chown(secret, "postgres")
        self._run(_pg_bin("initdb"), "-D", self.data, "-U", self.USER, "-A", "scram-sha-256", f"--pwfile={secret}")

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def uri(self, database: str) -> str:
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        subprocess.run(["psql", self.uri("postgres"), "-q", "-c", f"CREATE DATABASE {name}"], check=True)


class TeamServer:
    """docker/mlflow-server.sh on loopback over `postgres`: runs and users in their own databases,
    a random admin password, artifacts under `root`."""

    ADMIN = "admin"

    def __init__(self, root, postgres: Postgres):
        self.root, self.postgres, self.port = str(root), postgres, free_port()
        self.password, self.proc = secrets.token_hex(12), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for name in ("mlflow", "mlflow_auth"):
            self.postgres.create_database(name)
        env = {**os.environ, "MLFLOW_DB_URI": self.postgres.uri("mlflow"), "MLFLOW_AUTH_DB_URI": self.postgres.uri("mlflow_auth"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
               "MLFLOW_ARTIFACTS": os.path.join(self.root, "artifacts"), "MLFLOW_HOST": "127.0.0.1",
               "MLFLOW_PORT": str(self.port), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        self.proc = subprocess.Popen(["sh", os.path.join(REPO, "docker", "mlflow-server.sh"), "--workers", "4"], env=env,
                                     stdout=open(os.path.join(self.root, "server.log"), "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        while self.proc.poll() is None and not self._healthy() and time.monotonic() < deadline:
            time.sleep(1)
        if not self._healthy():
            raise RuntimeError(f"the MLflow server did not start: see {self.root}/server.log")

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2):
                return True
        except OSError:
            return False

    def login(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.ADMIN, "MLFLOW_TRACKING_PASSWORD": self.password}

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def main() -> None:
    postgres = Postgres()
    postgres.init()
    postgres.start()
    server = TeamServer(postgres.root, postgres)
    try:
        server.start()
        print(f"MLflow on PostgreSQL: {server.uri}\n"
              f"  export MLFLOW_TRACKING_USERNAME={server.ADMIN} MLFLOW_TRACKING_PASSWORD={server.password}\n"
              f"  mtml train --config jobs/configs/demo.yaml --tracking-uri {server.uri}\n"
              "Ctrl-C stops both and removes the data.", flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        postgres.stop()
        postgres.remove()


if __name__ == "__main__":
    main()
