"""``clad bench --engine ray``: the same records as the local engine, the same cache, failures and interrupts."""
from __future__ import annotations

import _thread
import json
import operator
import signal
import threading
import time

import pytest
import torch
from threadpoolctl import threadpool_limits

pytest.importorskip("ray")

from clad import bench  # noqa: E402
from clad.cli import main  # noqa: E402
from clad.cluster import grid  # noqa: E402

KNN = "patch_knn[backbone=tiny_cnn;image_size=64]@knn"
PADIM = "padim[backbone=tiny_cnn;image_size=64]@padim"
# what may differ between two runs of one cell: when, where and how fast it ran
TIMING = {"environment", "started", "seconds", "memory", "backbone_timing", "file"}


def _timing_metric(name: str) -> bool:
    return name.endswith(("_seconds", "_ms_per_image", "_mb")) or name == "predict_over_backbone"


@pytest.fixture(scope="module")
def ray_cluster():
    from clad.cluster import connect

    ray = connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from clad.data import make_synthetic_mvtec

    root = tmp_path_factory.mktemp("ray_bench_data")
    make_synthetic_mvtec(root, category="tile", n_train=3, n_test_good=2, n_test_defect=3, size=64, seed=0)
    return root


def _comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in TIMING}
    out["metrics"] = {k: v for k, v in record.get("metrics", {}).items() if not _timing_metric(k)}
    return out


def _by_file(records) -> dict:
    return {r["file"]: r for r in records}


def test_local_and_ray_engines_give_the_same_records_and_a_rerun_is_cached(synth, ray_cluster, tmp_path):
    # two detectors x two seeds, each also on a corrupted test set that reuses the clean run's fit: 8 runs in
    # 4 Ray tasks (one per fit)
    args = dict(data=f"mvtec:{synth}", categories="tile", detectors=f"{KNN},{PADIM}", shots="1", runs=2,
                progress=False, plots=False, corruptions="gaussian_noise:2")
    # with a task's one thread (torch's, and numpy's BLAS: Ray sets OMP_NUM_THREADS=1 in the task): another thread
    # count may change the pixel metrics' last digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            local = bench.run_bench(tmp_path / "local", **args)
    finally:
        torch.set_num_threads(threads)
    ray = bench.run_bench(tmp_path / "ray", engine="ray", **args)
    for summary in (local, ray):
        assert (summary["ran"], summary["cached"], summary["failed"], summary["planned"]) == (8, 0, 0, 8)
    by_local, by_ray = _by_file(local["records"]), _by_file(ray["records"])
    assert list(by_local) == list(by_ray)  # same runs, same files, in plan order
    for name, rec in by_local.items():
        assert _comparable(by_ray[name]) == _comparable(rec), name  # same AUROCs, same scores
    shared = [r for r in ray["records"] if r["settings"].get("corruption")]
    assert shared and all(r["fit_shared_with"] == r["settings"]["label"] for r in shared)
    assert {r["environment"]["torch_threads"] for r in ray["records"]} == {1}  # the task's one CPU

    docs = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("local", "ray")}
    assert [_comparable(r) for r in docs["ray"]["runs"]] == [_comparable(r) for r in docs["local"]["runs"]]
    assert docs["ray"]["tables"]["table1"] == docs["local"]["tables"]["table1"]  # the AUROC table
    assert docs["ray"]["settings"]["engine"] == {"name": "ray", "address": None, "cluster_cpus": 2, "cpus_per_run": 1}
    assert "engine" not in docs["local"]["settings"]

    again = bench.run_bench(tmp_path / "ray", engine="ray", **args)
    assert (again["ran"], again["cached"], again["failed"]) == (0, 8, 0)
    # the local engine finds the ray engine's cache, and the other way round
    assert bench.run_bench(tmp_path / "ray", **args)["cached"] == 8


def test_a_failing_run_or_task_is_recorded_and_the_others_finish(synth, ray_cluster, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    dets = f"{KNN},patch_knn[backbone=tiny_cnn;image_size=64;bogus=1]@bad"
    assert main(["bench", "--data", f"mvtec:{synth}", "--categories", "tile", "--detectors", dets, "--runs", "1",
                 "--out", str(out), "--no-plots", "--engine", "ray"]) == 1  # 1: some run failed
    doc = json.loads((out / "results.json").read_text())
    by_label = {r["settings"]["label"]: r for r in doc["runs"]}
    assert by_label["knn"]["status"] == "ok"
    assert by_label["bad"]["status"] == "failed" and "bogus" in by_label["bad"]["error"]
    assert "--engine ray" in " ".join(doc["settings"]["command"])

    # a task that dies (not a run that raises) fails the runs of its group; the next invocation retries them
    real = grid.RayGrid.run

    def first_task_dies(self, fn, tasks, **kw):
        for k, result, error in real(self, fn, tasks, **kw):
            yield (k, None, RuntimeError("worker died")) if k == 0 else (k, result, error)

    monkeypatch.setattr(grid.RayGrid, "run", first_task_dies)
    out2 = tmp_path / "bench2"
    args = dict(data=f"mvtec:{synth}", categories="tile", detectors=KNN, shots="1", runs=2, progress=False,
                plots=False, engine="ray")
    first = bench.run_bench(out2, **args)
    assert (first["ran"], first["failed"]) == (1, 1)
    (dead,) = [r for r in first["records"] if r["status"] == "failed"]
    assert dead["settings"]["seed"] == 0 and dead["error"] == "RuntimeError: worker died"
    monkeypatch.setattr(grid.RayGrid, "run", real)
    second = bench.run_bench(out2, **args)
    assert (second["ran"], second["cached"], second["failed"]) == (1, 1, 0)


def test_the_grid_yields_results_and_errors_as_tasks_finish(ray_cluster):
    cluster = grid.RayGrid()
    results = sorted(cluster.run(operator.truediv, [(1, 0), (6, 3)]), key=lambda r: r[0])
    assert results[1] == (1, 2.0, None)
    assert results[0][1] is None and "ZeroDivisionError" in repr(results[0][2])
    cluster.close()
    assert ray_cluster.is_initialized()  # a cluster it joined is left running


def test_an_interrupt_keeps_finished_results_and_cancels_the_rest(ray_cluster):
    cluster = grid.RayGrid()
    results = cluster.run(time.sleep, [(0,), (600,)])
    got = [next(results)]  # the quick one
    # Ctrl-C as Python's default handler takes it (a handler left by an earlier test turned it into nothing in a
    # fresh-clone CI run of the whole suite; this test is about the grid, not about that handler).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    landed = threading.Event()

    def ctrl_c():  # Ctrl-C while the driver waits for the slow one; again each second until one lands (at most 20):
        for _ in range(20):  # an interrupt that arrives inside Ray's own wait can be lost there, as a user's can
            if landed.wait(1.0):
                return
            _thread.interrupt_main()

    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            got += list(results)
    finally:
        landed.set()
        signal.signal(signal.SIGINT, previous)
    assert got == [(0, None, None)]
    for _ in range(100):  # the slow task is cancelled: its CPU comes back
        if ray_cluster.available_resources().get("CPU") == 2:
            break
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU") == 2


def test_bad_engine_options_are_one_error_line(synth, ray_cluster, tmp_path, capsys):
    base = ["bench", "--data", f"mvtec:{synth}", "--detectors", KNN, "--out", str(tmp_path / "b")]
    assert main([*base, "--cpus-per-run", "2"]) == 2
    assert "are for --engine ray" in capsys.readouterr().err
    assert main([*base, "--engine", "ray", "--cpus-per-run", "3"]) == 2
    assert "no node of the Ray cluster has that many CPUs" in capsys.readouterr().err


def test_sigterm_cancels_the_tasks_keeps_finished_runs_and_writes_the_tables(synth, ray_cluster, tmp_path):
    """Through the command, joining this module's cluster: ray.init's own SIGTERM handling (exit, abort) is undone.
    (The cancelling of tasks still running: ``test_an_interrupt_keeps_finished_results_and_cancels_the_rest``.)"""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench"
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "clad.cli", "bench", "--data", f"mvtec:{synth}", "--categories", "tile",
           "--detectors", KNN, "--runs", "8", "--out", str(out), "--no-plots", "--engine", "ray",
           "--address", ray_cluster.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):  # the first run's record (at most 2 minutes)
            if proc.poll() is not None or any((out / "runs").glob("*.json")):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    kept = len(list((out / "runs").glob("*.json")))
    assert 1 <= kept < 8
    assert "the bench was interrupted" in (out / "report.md").read_text()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == kept
