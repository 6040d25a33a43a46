"""Tasks larger than memory: streamed vs in-memory training, side by side in one run.

    python jobs/bench_data.py [--big-rows 30000000] [--small-rows 2000000] [--steps 400] [--repeats 1]

1. A suite whose tasks are each larger than 2 GB as float32 (2 mmoe tasks x `--big-rows` rows x
   16 features), trained streamed (the default `data.max_in_memory_mb` streams it): samples/s and
   the peak RSS of the driver and of each worker, next to what loading it would take.
2. A suite that fits (2 x `--small-rows` rows): streamed (`data.max_in_memory_mb: 0`) vs in
   memory, samples/s and peak RSS, for the article's trunk (100, 50) and a 4 x 1024 trunk; with
   `--repeats N`, each pair N times and the medians of the ratios (the in-memory peak varies
   between runs, up to 2x).

Every run is `mtml train` in a subprocess, as a user runs it, with 2 workers of 0.5 CPU each
(so that a CPU is left for Ray Data's reads on a 2-core machine). Memory is each process's
private resident memory (RssAnon), its peak taken from /proc every 0.1 s while the run goes: a
worker also maps pages of Ray's shared object store, which count in its RSS but are the node's
store (bounded by Ray Data's budget), so they are shown apart as "shared". Growth is a peak minus
the same process's peak in the same run on a 2 x 20,000-row suite: what the data adds to the fixed
cost of Python, torch, Ray and MLflow. Throughput is the run's best epoch after the first, from
MLflow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_mtml.data.generators import make_suite  # noqa: E402

WORK = tempfile.mkdtemp(prefix="mtml_bench_data_")
MODELS = {"article": ("article (100, 50)", (100, 50)), "4x1024": ("4 x 1024", (1024,) * 4)}
URI = f"sqlite:///{WORK}/mlflow.db"


def _status(pid: int) -> dict[str, int]:
    """RssAnon (private) and RssShmem (shared object store pages) of a process, in MB (empty once
    it is gone). Linux's own split, read from /proc: psutil's `shared` also counts file-backed
    pages (the libraries), which would blur the object store's share."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssShmem")))
    except OSError:
        return {}
    return {k: int(v.split()[0]) // 1024 for k, v in fields.items()}


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def peak(result: dict, kind: str, which: int = 0) -> int:
    """The largest private (`which` 0) or shared (1) peak of the run's processes of `kind`."""
    return max(p[which] for p in result["peaks"][kind])


class PeakWatcher:
    """Polls every process every 0.1 s: the driver's and every Ray Train worker's peak private and shared
    resident memory."""

    def __init__(self, driver: int):
        self.driver, self.seen, self.stop = driver, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in psutil.pids():
                kind = "driver" if pid == self.driver else ("worker" if "RayTrainWorker" in _cmdline(pid) else None)
                status = _status(pid) if kind else {}
                if status:
                    _, private, shared = self.seen.get(pid, (kind, 0, 0))
                    self.seen[pid] = (kind, max(private, status["RssAnon"]), max(shared, status["RssShmem"]))
            time.sleep(0.1)

    def result(self) -> dict[str, list[tuple[int, int]]]:
        """kind -> [(private peak MB, shared peak MB)] per process."""
        self.stop.set()
        self.thread.join()
        out: dict[str, list[tuple[int, int]]] = {"driver": [], "worker": []}
        for kind, private, shared in self.seen.values():
            out[kind].append((private, shared))
        return out


def run(name: str, suite: str, widths: list[int], streamed: bool, steps: int) -> dict:
    config = {
        "suite": {"path": suite},
        "model": {"trunk": {"widths": widths}},
        "training": {"epochs": 3, "batch_size": 256, "steps_per_epoch": steps, "lr": 0.001},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},  # a CPU left for Ray Data on 2 cores
        "data": {"max_in_memory_mb": 0 if streamed else 1e9},
        "checkpoint": {"every_n_epochs": 1000, "dir": os.path.join(WORK, "runs")},
        "tracking": {"experiment": "bench-data"},
    }
    path = os.path.join(WORK, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    begin = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "distributed_mtml", "train", "--config", path, "--tracking-uri", URI],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = PeakWatcher(proc.pid)
    output = proc.communicate()[0]
    peaks = watcher.result()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{output[-3000:]}")
    return {"name": name, "peaks": peaks, "throughput": _throughput(name), "wall_s": time.perf_counter() - begin}


def _throughput(config_name: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(URI)
    exp = client.get_experiment_by_name("bench-data")
    latest = client.search_runs([exp.experiment_id], f"tags.`mtml.config_name` = '{config_name}'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    history = sorted(client.get_metric_history(latest.info.run_id, "throughput/samples_per_s"), key=lambda m: m.step)
    return max(m.value for m in history[1:] or history)


def _suite(rows: int) -> str:
    path = os.path.join(WORK, f"mmoe-{rows}")
    begin = time.perf_counter()
    make_suite("mmoe", path, {"rows": rows, "tasks": 2, "features": 16, "sines": 2, "seed": 0})
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**30
    print(f"  made {path}: 2 tasks x {rows:,} rows x 16 features ({size:.1f} GiB of Parquet) in "
          f"{time.perf_counter() - begin:.0f} s", flush=True)
    return path


def _float32_gb(rows: int) -> float:
    """One task's rows (16 features, target) as float32, the tensors a worker would hold."""
    return rows * 17 * 4 / 2**30


def _line(r: dict, base: dict) -> str:
    """A run's samples/s and peaks, with the growth over the same run on the tiny suite."""
    w = ", ".join(f"{p} MB" for p, _ in r["peaks"]["worker"])
    return (f"  {r['name']:<20} {r['throughput']:>8,.0f} samples/s  driver {peak(r, 'driver')} MB "
            f"(+{growth(r, base, 'driver')})  workers {w} (+{growth(r, base, 'worker')}; shared "
            f"{peak(r, 'worker', 1)} MB)  {r['wall_s']:.0f} s")


def growth(r: dict, base: dict, kind: str) -> int:
    return peak(r, kind) - peak(base, kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-rows", type=int, default=30_000_000)
    p.add_argument("--small-rows", type=int, default=2_000_000)
    p.add_argument("--steps", type=int, default=400, help="steps per epoch (3 epochs per run)")
    p.add_argument("--sections", default="1,2", help="which of the two comparisons to run")
    p.add_argument("--models", default="article,4x1024", help=f"section 2's models, of: {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=1, help="section 2: run each pair this many times, print medians")
    a = p.parse_args()
    sections = {int(x) for x in a.sections.split(",")}
    print(f"bench_data: {os.cpu_count()} CPUs; work dir {WORK}; batch 256 per task, {a.steps} steps x 3 epochs")
    tiny = _suite(20_000)  # a streamed pass of it is 54 batches: few Ray Data executions, as in the real runs
    models = [MODELS[name] for name in a.models.split(",")]
    widths = {w for _, w in models} if 2 in sections else {(100, 50)}
    base = {(len(w), s): run(f"tiny-{len(w)}-{s}", tiny, list(w), s, 20) for w in widths for s in (True, False)}
    if 1 in sections:
        _large(a, base)
    if 2 in sections:
        _fits(a, base, models)


def _large(a: argparse.Namespace, base: dict) -> None:
    print(f"\n1. tasks larger than memory: 2 x {a.big_rows:,} rows ({_float32_gb(a.big_rows):.1f} GiB each as float32)")
    suite = _suite(a.big_rows)
    big = run("big-streamed", suite, [100, 50], streamed=True, steps=a.steps)
    print(_line(big, base[2, True]))
    need = _float32_gb(a.big_rows) * 1024
    for kind in ("driver", "worker"):
        print(f"  {kind}: streamed growth {growth(big, base[2, True], kind)} MB = "
              f"{growth(big, base[2, True], kind) / need:.3f}x of one task's tensors ({need:,.0f} MB as float32)")
    loaded = _load_growth(suite)
    print(f"  loading one of its tasks as a worker does in memory (suite.load_task): +{loaded} MB private peak")
    for kind in ("driver", "worker"):
        print(f"  {kind}: streamed growth / that = {growth(big, base[2, True], kind) / loaded:.3f}x")


def _load_growth(suite: str) -> int:
    """Peak resident memory, over the imports, of loading the suite's first task whole: what an
    in-memory worker (and, before streaming, the driver's plan) held for one task."""
    code = ("from distributed_mtml.data.suite import load_suite_spec, load_task\n"
            "from distributed_mtml.compat import peak_resident_mb as peak\n"
            f"base = peak(); d = load_task({suite!r}, load_suite_spec({suite!r}).tasks[0]); print(int(peak() - base))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _fits(a: argparse.Namespace, base: dict, models: list) -> None:
    print(f"\n2. a suite that fits: 2 x {a.small_rows:,} rows ({_float32_gb(a.small_rows) * 1024:,.0f} MB each as float32)"
          + (f", each pair run {a.repeats} times" if a.repeats > 1 else ""))
    small = _suite(a.small_rows)
    for label, widths in models:
        print(f" {label}:")
        ratios = [_pair(small, widths, base, a.steps) for _ in range(a.repeats)]
        if a.repeats > 1:
            medians = [statistics.median(r[i] for r in ratios) for i in range(3)]
            print(f"  median of {a.repeats}: throughput {medians[0]:.2f}x, peak RSS growth driver {medians[1]:.2f}x, "
                  f"worker {medians[2]:.2f}x")


def _pair(suite: str, widths: tuple, base: dict, steps: int) -> tuple[float, float, float]:
    """One streamed and one in-memory run, printed; streamed / in-memory throughput and peak
    growths (driver, worker)."""
    streamed, loaded = [run(f"{'streamed' if s else 'in-memory'}-{len(widths)}", suite, list(widths), s, steps)
                        for s in (True, False)]
    for r, s in ((streamed, True), (loaded, False)):
        print(_line(r, base[len(widths), s]))
    ratio = [growth(streamed, base[len(widths), True], k) / max(growth(loaded, base[len(widths), False], k), 1)
             for k in ("driver", "worker")]
    speed = streamed["throughput"] / loaded["throughput"]
    print(f"  streamed / in-memory: throughput {speed:.2f}x, peak RSS growth driver {ratio[0]:.2f}x, "
          f"worker {ratio[1]:.2f}x", flush=True)
    return speed, ratio[0], ratio[1]


if __name__ == "__main__":
    main()
