"""Tracking under load: many runs logging at once to the local SQLite file and to the team's server.

    python jobs/bench_tracking.py [--runs 1 4 16 32] [--epochs 20] [--keys 20] [--interval 0.5] [--stores sqlite server]

For each count N, N processes start together; each creates a run through `mtml`'s own tracker
(the local store under its lock; the server with a login) and logs `keys` metrics per epoch
(one `log_batch`, as a 5-task run's reports) every `interval` seconds for `epochs` epochs, then
ends its run. Printed side by side for (a) a new SQLite file and (b) the team's server
(docker/mlflow-server.sh on a PostgreSQL on loopback, started here: jobs/team_server.py):
runs finished, write errors, metrics lost (logged without error but not in the store), and the
time of one `log_batch` (median, p99). Target: 32 runs at once on the server, 0 errors, 0 lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from distributed_mtml import compat
from distributed_mtml.report import table

WORK = tempfile.mkdtemp(prefix="mtml_bench_tracking_")


def one_run(uri: str, name: str, epochs: int, keys: int, interval: float, out: str) -> None:
    """A run's life as the benchmark's child process: its timings and errors to `out` (JSON)."""
    from distributed_mtml.tracking import Tracker

    tracker, latencies, errors, run_id = Tracker(uri), [], [], None
    try:
        run_id = tracker.create_run("bench-tracking", name, {}, {"keys": keys}, config_name=name)
        for epoch in range(epochs):
            metrics = {f"val/task{k % 5}/metric{k}": float(epoch + k) for k in range(keys)}
            begin = time.perf_counter()
            try:
                tracker.log_metrics(run_id, metrics, step=epoch)
                latencies.append(time.perf_counter() - begin)
            except Exception as e:  # noqa: BLE001 - counted, as a user's run would see it
                errors.append(str(e).splitlines()[0][:200])
            time.sleep(interval)
        tracker.set_status(run_id, "FINISHED")
    except Exception as e:  # noqa: BLE001
        errors.append(str(e).splitlines()[0][:200])
    with open(out, "w") as f:
        json.dump({"run_id": run_id, "latencies": latencies, "errors": errors}, f)


def _load(uri: str, count: int, args, env: dict) -> list[str]:
    """`count` runs at once against `uri`: a table row."""
    outs = [os.path.join(WORK, f"{abs(hash(uri))}-{count}-{i}.json") for i in range(count)]
    begin = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--one", uri, f"load{count}-{i}", str(args.epochs), str(args.keys),
                               str(args.interval), out], env={**os.environ, **env}) for i, out in enumerate(outs)]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - begin
    results = [json.load(open(out)) if os.path.exists(out) else {"run_id": None, "latencies": [], "errors": ["no result"]}
               for out in outs]
    lost, finished = _lost_and_finished(uri, env, results, args)
    latencies = np.array([t for r in results for t in r["latencies"]]) * 1000
    errors = sum(len(r["errors"]) for r in results)
    for r in results:
        for e in r["errors"][:1]:
            print(f"[bench] {uri.split(':')[0]} x{count}: {e}", flush=True)
    return [uri.split("://")[0], count, f"{finished}/{count}", errors, lost,
            f"{np.median(latencies):.0f}" if len(latencies) else "-",
            f"{np.percentile(latencies, 99):.0f}" if len(latencies) else "-", f"{wall:.0f}"]


def _lost_and_finished(uri: str, env: dict, results: list[dict], args) -> tuple[int, int]:
    """Metrics a run logged without an error that the store does not hold, and runs FINISHED."""
    from mlflow.tracking import MlflowClient

    with compat.environment(**env):  # the server's login, for this process's client
        client, lost, finished = MlflowClient(uri), 0, 0
        for r in results:
            if r["run_id"] is None:
                continue
            run = client.get_run(r["run_id"])
            finished += run.info.status == "FINISHED"
            stored = sum(len(client.get_metric_history(r["run_id"], f"val/task{k % 5}/metric{k}")) for k in range(args.keys))
            lost += len(r["latencies"]) * args.keys - stored
        return lost, finished


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--keys", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a run's reports (its epoch time)")
    p.add_argument("--stores", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        uri, name, epochs, keys, interval, out = a.one
        return one_run(uri, name, int(epochs), int(keys), float(interval), out)
    print(f"bench_tracking: {os.cpu_count()} CPUs; {a.epochs} reports of {a.keys} metrics, {a.interval} s apart; "
          f"work dir {WORK}", flush=True)
    rows = []
    if "sqlite" in a.stores:
        for count in a.runs:
            rows.append(_load(f"sqlite:///{WORK}/sqlite-{count}.db", count, a, {}))
            print(f"[bench] {rows[-1]}", flush=True)
    if "server" in a.stores:
        from team_server import Postgres, TeamServer

        postgres = Postgres()
        postgres.init()
        postgres.start()
        server = TeamServer(tempfile.mkdtemp(prefix="mtml_bench_server_"), postgres)
        try:
            server.start()
            for count in a.runs:
                rows.append(_load(server.uri, count, a, server.login()))
                print(f"[bench] {rows[-1]}", flush=True)
        finally:
            server.stop()
            postgres.stop()
            postgres.remove()
    print()
    print(table(["store", "runs at once", "finished", "errors", "metrics lost", "log_batch median ms",
                 "p99 ms", "wall s"], rows))


if __name__ == "__main__":
    main()
