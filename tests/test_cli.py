import subprocess
import sys

from distributed_mtml.cli import main


def test_help_lists_every_command_and_generator(capsys):
    proc = subprocess.run([sys.executable, "-m", "distributed_mtml", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ["demo", "data", "train", "evaluate"]:
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "distributed_mtml", "data", "make", "--help"], capture_output=True, text=True)
    for generator in ["seed-example", "mmoe", "sinusoid"]:
        assert generator in proc.stdout


def test_data_make_and_show(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["data", "make", "mmoe", "--out", out, "--tasks", "3", "--rows", "100", "--train_rows", "20"]) == 0
    assert main(["data", "show", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    task_rows = [line.split() for line in lines if line.startswith("task")][1:]
    assert [r[0] for r in task_rows] == ["task0", "task1", "task2"]
    assert [r[2:5] for r in task_rows] == [["20", "40", "40"]] * 3


def test_bad_generator_option_exits_2(tmp_path, capsys):
    assert main(["data", "make", "seed-example", "--out", str(tmp_path), "--rows", "30", "--train_rows", "29"]) == 2
    err = capsys.readouterr().err
    assert "train_rows (29) must leave at least 2 of 30 rows" in err


def test_help_and_validate_do_not_import_ray_mlflow_or_torch(seed_suite):
    code = (
        "import sys\n"
        "from distributed_mtml.cli import main\n"
        f"assert main(['data', 'validate', {seed_suite!r}]) == 0\n"
        "heavy = [m for m in ('ray', 'mlflow', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_affinity_reports_what_the_tracking_server_actually_said(capsys):
    """A server that refuses the request (here: 401 on every API call, healthy otherwise) is
    not 'no relations/affinity.csv': the login check before the command says what the server
    answered, in one line, exit 2."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            healthy = self.path.startswith("/health")
            body = b"OK" if healthy else json.dumps({"error_code": "UNAUTHENTICATED", "message": "token expired"}).encode()
            self.send_response(200 if healthy else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["affinity", "--run", "0" * 32, "--tracking-uri", uri]) == 2
    finally:
        server.shutdown()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "refused no login (HTTP 401: token expired)" in line and "affinity.csv" not in line


def test_runs_of_one_config_get_distinct_names_and_are_found_by_it(tmp_path):
    from distributed_mtml.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    first = tracker.create_run("e", "demo", {}, {}, config_name="demo")
    second = tracker.create_run("e", "demo", {}, {}, config_name="demo")
    client = tracker.client()
    names = [client.get_run(r).info.run_name for r in (first, second)]
    assert names[0] != names[1] and all(n.startswith("demo-") for n in names)
    assert tracker.find_resumable_run("e", "demo") == second  # the newest unfinished one
    tracker.set_status(second, "FINISHED")
    assert tracker.find_resumable_run("e", "demo") == first
    old = client.create_run(client.get_experiment_by_name("e").experiment_id, run_name="older").info.run_id
    assert tracker.find_resumable_run("e", "older") == old  # runs from before the tag: by name
    assert tracker.find_resumable_run("e", "other") is None


def test_progress_line_names_few_tasks_and_summarises_many():
    from distributed_mtml.runtime.callback import progress_line

    few = {"val/mean_loss": 0.5, "throughput/samples_per_s": 10.0, "val/a/r2": 0.25, "val/b/accuracy": 0.75}
    assert progress_line(0, 2, few) == "[mtml] epoch 1/2 | val/mean_loss 0.5000 | a r2 0.2500 | b accuracy 0.7500 | 10 samples/s"
    many = {"val/mean_loss": 0.5, "throughput/samples_per_s": 10.0, **{f"val/t{i}/r2": i / 100 for i in range(20)}}
    line = progress_line(1, 2, many)
    assert "t7 r2" not in line and "r2 median 0.0950 (min 0.0000, max 0.1900, 20 tasks)" in line


def test_mtml_reads_with_the_system_allocator_unless_the_user_chose_one():
    """Arrow reads its pool variable once: the CLI module must set it before anything allocates
    (compat); a pool the user named wins."""
    import os

    code = "import distributed_mtml.cli, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    for chosen, expected in ((None, "system"), ("jemalloc", "jemalloc")):
        run_env = env if chosen is None else {**env, "ARROW_DEFAULT_MEMORY_POOL": chosen}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
