"""``clad serve`` under load, beside ``clad predict`` on the same images, then a crash check. Loopback only.

    python benchmarks/serve_load.py                         # the demo model, 96 images per level, 1/4/16 clients
    python benchmarks/serve_load.py --model DIR --images DIR --n 200

1. The model: ``--model`` (a ``clad fit`` folder), else the demo's (``clad.demo.fit_demo_model``: PatchCore on the
   synthetic tile set, 192 px images). The images: ``--images`` (a folder), else the demo's test images; ``--n``
   requests per level cycle through them.
2. ``clad predict`` (batch 16) on a folder of those ``--n`` images, in a fresh process: images/s from the time it
   reports for its run (after start-up and loading, as the service's figures are).
3. ``clad serve`` (a fresh process, a fresh history; images stored, as by default) gets the ``--n`` images posted
   at each number of concurrent clients (``--clients``), after a warm-up; per level: images/s (requests answered
   201 over the level's wall time), latency percentiles of the answered requests, errors (anything else), the
   server's peak RSS so far (VmHWM of its process). Each level stops after ``--max-seconds``.
4. Crash check: 16 clients post images; after ``--kill-after`` acknowledged (201) inspections the server gets
   SIGKILL; it is started again on the same history, every acknowledged id must be there (GET 200 with the same
   score), and SQLite's ``PRAGMA integrity_check`` must answer ok (``--no-crash-check``: skipped, e.g. for
   ``--serve-args "--engine ray --replicas 2"``, whose SIGKILLed driver would leave its cluster behind).

Prints a markdown table and the load average of the machine (``os.getloadavg``) before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))
from serve_helpers import Server  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def peak_rss_mib(pid: int) -> float:
    """The peak RSS (VmHWM) of ``pid`` and every process below it (``--engine ray``: the cluster and its
    replicas), summed."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")), 0) / 1024
        except OSError:
            pass
    return total or float("nan")


def cli_images_per_second(model: Path, images: Path, out: Path) -> tuple[float, float]:
    """``clad predict`` on ``images``: (images/s of its run, its wall seconds with start-up)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "clad.cli", "predict", "--model", str(model), "--input", str(images),
                        "--out", str(out), "--batch-size", "16"], capture_output=True, text=True, env=env,
                       timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"clad predict failed:\n{p.stderr}")
    m = re.search(r"predict: (\d+) image\(s\) scored.* in ([\d.]+) s", p.stdout)
    n, seconds = int(m.group(1)), float(m.group(2))
    return n / seconds, wall


async def post_all(url: str, payloads: list[tuple[bytes, str]], clients: int, max_seconds: float,
                   stop_after: int | None = None, on_stop=None) -> dict:
    """Post every payload with ``clients`` concurrent workers; returns latencies (s) of the 201s, their ids and
    scores, error counts and the wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    lat, acked, errors = [], {}, {}
    deadline = time.perf_counter() + max_seconds
    stopped = asyncio.Event()

    async def worker(client: httpx.AsyncClient):
        while not queue.empty() and time.perf_counter() < deadline and not stopped.is_set():
            data, kind = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                r = await client.post(url, content=data, headers={"Content-Type": kind})
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code == 201:
                lat.append(time.perf_counter() - t0)
                body = r.json()
                acked[body["id"]] = body["score"]
                if stop_after is not None and len(acked) >= stop_after and not stopped.is_set():
                    stopped.set()
                    on_stop()
            else:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(clients)])
    return {"latencies": lat, "acked": acked, "errors": errors, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a `clad fit` folder (default: the demo model, fitted here)")
    ap.add_argument("--images", help="a folder of images to post (default: the demo's test images)")
    ap.add_argument("--n", type=int, default=96, help="requests per level (default 96)")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per level (default 1,4,16)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="longest time per level (default 300)")
    ap.add_argument("--kill-after", type=int, default=40, help="crash check: SIGKILL after this many 201s")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--serve-args", default="", help="more arguments for clad serve, e.g. '--max-batch 8'")
    ap.add_argument("--no-crash-check", action="store_true", help="measure the levels only")
    args = ap.parse_args()
    load_before = os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="clad_serve_load_"))
    try:
        return run(args, work, load_before)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, load_before) -> int:
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        from clad.demo import fit_demo_model

        demo = fit_demo_model(work / "demo")
        model = demo["model"]
    sources = (sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
               if args.images else [Path(p) for p in fit_demo_model(work / "demo")["test"]])
    if not sources:
        raise SystemExit("no images to post")
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
             ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}
    payloads = [(sources[i % len(sources)].read_bytes(), kinds[sources[i % len(sources)].suffix.lower()])
                for i in range(args.n)]
    folder = work / "cli_input"
    folder.mkdir(exist_ok=True)
    for i in range(args.n):
        src = sources[i % len(sources)]
        shutil.copyfile(src, folder / f"{i:05d}{src.suffix.lower()}")

    cli_ips, cli_wall = cli_images_per_second(model, folder, work / "cli_out")
    print(f"clad predict: {cli_ips:.1f} images/s ({args.n} images; {cli_wall:.1f} s with start-up)", flush=True)

    levels = [int(c) for c in args.clients.split(",")]
    serve_args = [str(model), "--data-dir", str(work / "station"), *args.serve_args.split()]
    rows = []
    server = Server(serve_args)
    try:
        server.wait_ready()
        url = f"{server.url}/api/v1/models/{model.name}/inspect"
        asyncio.run(post_all(url, payloads[:16], 4, 120))  # warm-up: not counted
        for c in levels:
            r = asyncio.run(post_all(url, payloads, c, args.max_seconds))
            lat = np.array(r["latencies"]) * 1000
            ips = len(lat) / r["seconds"]
            rows.append([f"clad serve, {c} client(s)", len(lat), f"{ips:.1f}",
                         *(f"{np.percentile(lat, q):.0f}" if len(lat) else "-" for q in (50, 95, 99)),
                         sum(r["errors"].values()) or 0, f"{peak_rss_mib(server.proc.pid):.0f}",
                         f"{100 * ips / cli_ips:.0f} %"])
            print(f"{c} client(s): {ips:.1f} images/s, errors {r['errors'] or 0}", flush=True)
    finally:
        server.stop()

    if args.no_crash_check:
        print_table(args, model, sources, payloads, cli_ips, rows, load_before)
        return 0
    # crash check: SIGKILL under load, restart, every acknowledged inspection must be there
    server = Server(serve_args)
    server.wait_ready()
    url = f"{server.url}/api/v1/models/{model.name}/inspect"
    crash = asyncio.run(post_all(url, payloads * 4, 16, args.max_seconds, stop_after=args.kill_after,
                                 on_stop=lambda: os.kill(server.proc.pid, signal.SIGKILL)))
    server.kill()
    acked = crash["acked"]
    again = Server(serve_args)
    try:
        again.wait_ready()
        missing = [i for i, score in acked.items()
                   if httpx.get(f"{again.url}/api/v1/inspections/{i}", timeout=30).status_code != 200
                   or httpx.get(f"{again.url}/api/v1/inspections/{i}", timeout=30).json()["score"] != score]
        total = httpx.get(f"{again.url}/api/v1/inspections", params={"limit": 1}, timeout=30).json()["total"]
    finally:
        again.stop()
    db = sqlite3.connect(work / "station" / "station.db")
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    db.close()

    print_table(args, model, sources, payloads, cli_ips, rows, load_before)
    print(f"Crash check: SIGKILL after {len(acked)} acknowledged inspection(s) (errors while killing: "
          f"{crash['errors'] or 'none'}); after the restart {len(acked) - len(missing)} of {len(acked)} are in the "
          f"history with their scores ({total} rows in all); PRAGMA integrity_check: {integrity}.")
    return 0 if not missing and integrity == "ok" else 1


def print_table(args, model, sources, payloads, cli_ips, rows, load_before) -> None:
    load_after = os.getloadavg()
    print()
    print(f"Model {model.name} ({model}); {args.n} images per level ({len(sources)} distinct, "
          f"{payloads[0][1]}, {sum(len(p[0]) for p in payloads) // len(payloads) // 1024} KiB on average); "
          f"clad serve {args.serve_args or '(defaults)'}.")
    print()
    print("| run | images | images/s | p50 ms | p95 ms | p99 ms | errors | server peak RSS MiB | of the CLI's images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| clad predict, batch 16 | {args.n} | {cli_ips:.1f} | | | | | | 100 % |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    print()
    print(f"Load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in load_after)}; {os.cpu_count()} CPU(s).")


if __name__ == "__main__":
    sys.exit(main())
