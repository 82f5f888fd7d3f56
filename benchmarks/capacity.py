"""Per-core rates of each stage of batch scoring and of the station, and a capacity model of a cluster built on them.

    python benchmarks/capacity.py                                   # magnetic tile, 256 images, SQLite
    python benchmarks/capacity.py --pg --nodes 100 --cores 16      # also PostgreSQL (a throwaway local server)

Measured here, on one core each (``torch.set_num_threads(1)``), on ``--n`` images of ``--data``:

1. read: the image files' bytes from storage (warm page cache: an upper bound for a local disk; the model takes
   shared storage's bandwidth from ``--storage-gbps``);
2. decode: ``clad.data.io.decode_image`` of those bytes;
3. forward: the default detector (``clad fit`` defaults, fitted on ``--shots`` references of the category) in
   batches of 16: the backbone, the memory search and the map at the image's own size;
4. maps: encoding each map as ``float32``/``float16`` ``.npy`` and as a 16-bit PNG, with the bytes per image;
5. history: committed inserts of the station's ``inspections`` rows, one commit per batch of 16 (as the station
   does) and one per row, on SQLite (WAL, synchronous=FULL) and, with ``--pg-url``, on PostgreSQL.

The model: a cluster of ``--nodes`` nodes of ``--cores`` CPUs each scores ``nodes * cores / (decode + forward +
map)`` images per second if the CPUs are the limit; shared storage serves ``storage_gbps / bytes per image``;
each node's network carries its images in and its maps out (``--nic-gbps``); one database primary takes the
measured batched insert rate (an assumption stated as such: a dedicated server does better than this shared
2-core machine). The smallest of these is the throughput, and the table names the stage that sets it and what to
change for it. Prints markdown.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def image_paths(root: Path, n: int) -> list[Path]:
    from clad.data.io import is_image_file

    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p) and "ground_truth" not in p.parts)
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read(paths):
    blobs = []

    def read():
        blobs.clear()
        blobs.extend(p.read_bytes() for p in paths)

    read()  # warm the page cache
    seconds = timed(read, 3)
    return blobs, {"images_per_s": len(paths) / seconds, "mb_per_image": sum(map(len, blobs)) / len(blobs) / 1e6}


def measure_decode(blobs):
    from clad.data.io import decode_image

    images = []

    def decode():
        images.clear()
        images.extend(decode_image(b, "bench")[0] for b in blobs)

    seconds = timed(decode, 2)
    return images, {"images_per_s": len(blobs) / seconds,
                    "megapixels": statistics.mean(a.shape[0] * a.shape[1] for a in images) / 1e6}


def measure_forward(data: Path, images, shots: int, batch: int = 16):
    from clad.data import open_dataset
    from clad.registry import create_detector
    from clad.cli import DEFAULT_DETECTOR

    train = open_dataset(f"folder:{data / 'train' / 'good'}", None, "train", n_shots=shots, seed=0)
    det = create_detector(DEFAULT_DETECTOR)
    det.fit([s.image for s in train])
    det.predict(images[:batch], batch_size=batch)  # warm-up
    maps = []

    def forward():
        maps.clear()
        for i in range(0, len(images), batch):
            maps.extend(det.predict(images[i:i + batch], batch_size=batch).anomaly_maps)

    seconds = timed(forward, 1)
    return maps, {"images_per_s": len(images) / seconds, "detector": det.name}


def measure_maps(maps):
    from clad.serve.pictures import encode_map

    out = {}
    for name, enc in {
        "npy float32": lambda m: _npy(m.astype(np.float32)),
        "npy float16": lambda m: _npy(m.astype(np.float16)),
        "png16 (station, zlib level 1)": lambda m: encode_map(m)[0],
    }.items():
        sizes = []
        seconds = timed(lambda: sizes.extend(len(enc(m)) for m in maps), 1)
        out[name] = {"images_per_s": len(maps) / seconds, "mb_per_image": sum(sizes) / len(sizes) / 1e6}
    return out


def measure_csv(n: int = 20000) -> dict:
    """Rows of predictions.csv written per second (the driver writes every row)."""
    import csv

    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        t0 = time.perf_counter()
        for i in range(n):
            w.writerow([f"/data/line3/2026/12/03/image_{i:08d}.png", f"{0.123456789 * i:.9g}", "1", "0.5"])
        f.flush()
        os.fsync(f.fileno())
        return {"rows_per_s": n / (time.perf_counter() - t0)}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def measure_history(url: str, rows: int, batch: int) -> dict:
    from sqlalchemy import delete

    from clad.serve.db import Inspection, make_engine, migrate, session_factory, utcnow

    engine = make_engine(url)
    migrate(engine)
    Session = session_factory(engine)

    def row(i):
        return Inspection(created=utcnow(), model="capacity", model_version=1, source="bench", image_sha256=f"{i:064x}",
                          image_format="png", image_stored=False, width=256, height=256, score=0.5,
                          score_normalized=0.5, threshold=1.0, decision="normal", uncertain=False,
                          explanation={"sentence": "x" * 120, "regions": [{"box": [1, 2, 3, 4], "area": 0.01}]},
                          timings={"decode": 1.0, "predict": 2.0}, map_sha256=f"{i:064x}", map_min=0.0, map_max=1.0)

    out = {}
    for per_commit in (batch, 1):
        n = rows if per_commit > 1 else max(16, rows // 4)
        t0 = time.perf_counter()
        for i in range(0, n, per_commit):
            with Session() as s:
                s.add_all([row(j) for j in range(i, min(n, i + per_commit))])
                s.commit()
        out[f"rows_per_s_commit_{per_commit}"] = n / (time.perf_counter() - t0)
    with Session() as s:
        s.execute(delete(Inspection).where(Inspection.model == "capacity"))
        s.commit()
    engine.dispose()
    return out


def model(rates: dict, nodes: int, cores: int, storage_gbps: float, nic_gbps: float, maps: str) -> list[tuple]:
    """Rows (stage, images/s of the whole cluster, what sets it, what to change)."""
    cpu_seconds = 1 / rates["decode"]["images_per_s"] + 1 / rates["forward"]["images_per_s"]
    map_mb = 0.0
    if maps != "none":  # encoded by the driver (first row), carried by the nodes' network
        map_mb = rates["maps"][maps]["mb_per_image"]
    image_mb = rates["read"]["mb_per_image"]
    per_core_decode = rates["decode"]["images_per_s"]
    per_core_forward = rates["forward"]["images_per_s"]
    db = rates["history"][max(rates["history"])]
    if maps == "none":
        driver = (rates["csv"]["rows_per_s"], f"{rates['csv']['rows_per_s']:,.0f} CSV rows/s on one core",
                  "several runs side by side, each its own shard of the input (one driver each)")
    else:
        encode, nic = rates["maps"][maps]["images_per_s"], nic_gbps * 1e3 / 8 / map_mb
        driver = (min(encode, nic), f"the driver receives and writes every map: {encode:,.0f} maps/s encoded on one "
                  f"core, {nic:,.0f}/s through its {nic_gbps:g} Gbit/s", "--maps none for an archive's scores, or "
                  "several runs side by side, each its own shard of the input (one driver each)")
    rows = [
        ("one run's driver (Ray Data: results stream to one process)", *driver),
        ("CPU of the nodes: decode + forward", nodes * cores / cpu_seconds,
         f"{1000 * cpu_seconds:.1f} ms of one core per image (decode {1000 / per_core_decode:.1f}, forward "
         f"{1000 / per_core_forward:.1f})", "more nodes; a smaller backbone or image size"),
        ("decode alone", nodes * cores * per_core_decode, "decode tasks on every core",
         "Ray Data schedules decode tasks beside the actors: give them CPUs (num_cpus of the actor pool < cores)"),
        ("shared storage reads", storage_gbps * 1e3 / 8 / image_mb, f"{image_mb:.3f} MB per image at "
         f"{storage_gbps:g} Gbit/s", "more storage bandwidth, or images read where they are (node-local shards)"),
        ("node network (images in, maps out)", nodes * nic_gbps * 1e3 / 8 / (image_mb + map_mb),
         f"{image_mb + map_mb:.3f} MB per image at {nic_gbps:g} Gbit/s per node", "--maps float16/png16/none"),
        ("history database (one primary)", db["rows_per_s"], f"{db['rows_per_s']:.0f} committed rows/s "
         f"({db['how']}, measured here)", "one commit per batch (the station does), PostgreSQL on its own host; "
                                          "batch scoring writes files, not rows"),
    ]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    ap.add_argument("--n", type=int, default=256, help="images measured")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2048, help="history rows inserted per backend")
    ap.add_argument("--pg-url", help="also measure the history on this PostgreSQL database")
    ap.add_argument("--pg", action="store_true", help="also measure it on a throwaway local PostgreSQL server "
                    "(Debian's postgresql, fsync on, 127.0.0.1; tests/pg_helpers.py)")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--cores", type=int, default=16, help="CPUs per node")
    ap.add_argument("--storage-gbps", type=float, default=40.0, help="shared storage bandwidth, Gbit/s (assumed)")
    ap.add_argument("--nic-gbps", type=float, default=10.0, help="network per node, Gbit/s (assumed)")
    ap.add_argument("--maps", default="npy float16", choices=("none", "npy float32", "npy float16", "png16 (station, zlib level 1)"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    data = Path(args.data)
    if not data.is_dir():
        print(f"capacity: {data} is not a folder (the real data lives in ../shared/data)", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    paths = image_paths(data, args.n)
    rates = {}
    blobs, rates["read"] = measure_read(paths)
    images, rates["decode"] = measure_decode(blobs)
    maps, rates["forward"] = measure_forward(data, images, args.shots)
    rates["maps"] = measure_maps(maps)
    rates["csv"] = measure_csv()
    history, server = {}, None
    if args.pg and not args.pg_url:
        sys.path.insert(0, str(REPO / "tests"))
        from pg_helpers import PostgresServer, find_bindir

        server = PostgresServer(find_bindir(), fsync=True).start()
        args.pg_url = server.create_database("capacity")
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in [("SQLite", f"sqlite:///{tmp}/station.db")] + ([("PostgreSQL", args.pg_url)] if args.pg_url else []):
            for how, r in measure_history(url, args.rows, 16).items():
                history[f"{name} {how}"] = r
    if server is not None:
        server.stop()
    # the station's bound: batched commits on PostgreSQL when measured (what replicas share), else SQLite's
    shared = [k for k in history if k.startswith("PostgreSQL") and k.endswith("_16")] or [max(history, key=history.get)]
    rates["history"] = {"best": {"rows_per_s": history[shared[0]], "how": shared[0]}}

    print(f"# Per-core rates ({len(paths)} images of {data.name}, {rates['decode']['megapixels']:.3f} MP on average; "
          f"torch threads 1; load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after)\n")
    print("| stage | images/s on one core | notes |\n|---|---|---|")
    print(f"| read (warm page cache) | {rates['read']['images_per_s']:.0f} | {rates['read']['mb_per_image']:.3f} MB per image |")
    print(f"| decode | {rates['decode']['images_per_s']:.0f} | |")
    print(f"| forward ({rates['forward']['detector']}, batch 16) | {rates['forward']['images_per_s']:.1f} | |")
    for name, r in rates["maps"].items():
        print(f"| map encode, {name} | {r['images_per_s']:.0f} | {r['mb_per_image']:.4f} MB per image |")
    print(f"| predictions.csv rows (fsync at the end) | {rates['csv']['rows_per_s']:,.0f} | |")
    for name, r in history.items():
        print(f"| history insert, {name} | {r:.0f} rows/s | |")
    print(f"\n# Capacity of {args.nodes} nodes x {args.cores} CPUs (maps {args.maps}; storage {args.storage_gbps:g} "
          f"Gbit/s and {args.nic_gbps:g} Gbit/s per node assumed)\n")
    rows = model(rates, args.nodes, args.cores, args.storage_gbps, args.nic_gbps, args.maps)
    bottleneck = min(rows[:-1], key=lambda r: r[1])  # batch scoring writes files, not rows
    cluster = min(rows[1:-1], key=lambda r: r[1])  # what the nodes could do with the driver out of the way
    print("| bound | images/s | from | to raise it |\n|---|---|---|---|")
    for stage, rate, why, fix in rows:
        mark = " **(bottleneck)**" if stage == bottleneck[0] else ""
        print(f"| {stage}{mark} | {rate:,.0f} | {why} | {fix} |")
    per_day = bottleneck[1] * 86400
    station = min(rows, key=lambda r: r[1])
    print(f"\nbatch scoring: one run {bottleneck[1]:,.0f} images/s = {per_day / 1e6:,.1f} million images a day, set by "
          f"{bottleneck[0]}; the nodes alone {cluster[1]:,.0f} images/s, set by {cluster[0]} (so "
          f"{cluster[1] / bottleneck[1]:.0f} runs side by side fill them); the station (one history row per inspection): {station[1]:,.0f} images/s, set by "
          f"{station[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
