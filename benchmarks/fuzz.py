"""Fuzz the image decoder and the model loader: any exception other than clad's own errors is a finding.

    python benchmarks/fuzz.py --seconds 600                  # both targets, 10 minutes each (20 in all)
    python benchmarks/fuzz.py --target image --seconds 60

Targets:
- ``image``: the bytes are decoded by ``clad.data.io.decode_image`` (the station's uploads), then written to a
  file and read by ``load_image`` and ``load_mask``; they must return (H, W, 3) uint8 and (H, W) bool, or raise a
  ``CladError``.
- ``model``: tiny saved models (patch_knn, padim, spade on ``tiny_cnn``, 32 px) with one file mutated: the first
  byte picks the model and what is mutated (``config.json``, seeded as saved and as format 1; ``model.safetensors``;
  or ``model.safetensors`` with its sha256 in ``config.json`` updated to match, so the mutation reaches the
  tensors' checks), the rest is that file. ``load_detector``, then ``predict`` on one 24 x 20 image, must work
  or raise a ``CladError``.

Fuzzing is coverage-guided by atheris (libFuzzer) when it is installed; otherwise a plain random-mutation loop
(bit flips, byte insertions and deletions, truncation) runs instead and says so. Each target runs in its own
process, for ``--seconds``. Prints the number of inputs tried and each distinct finding (exception type and where
it was raised); the first input of each is saved under ``--out``. Exit status 1 when anything was found.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

try:
    import atheris
except ImportError:  # no wheel for this Python: the random-mutation loop below
    atheris = None

import numpy as np
import torch

TARGETS = ("image", "model")
MODELS = ("patch_knn", "padim", "spade")
MUTATED = ("config", "state", "state+sha256")  # what the first byte of a model input mutates


def _instrumented_imports():
    """Import PIL and clad under atheris' coverage instrumentation (torch and numpy stay uninstrumented)."""
    if atheris is None:
        import clad.data.io  # noqa: F401
        import clad.detectors  # noqa: F401
        return
    with atheris.instrument_imports(include=["PIL", "clad"]):
        import PIL.Image  # noqa: F401
        import clad.data.io  # noqa: F401
        import clad.detectors  # noqa: F401


class Target:
    """One fuzz target: its seed inputs and ``run(data)``, which returns or raises a ``CladError``, or else has
    found something."""

    def __init__(self, work: Path):
        self.work = work

    def seeds(self) -> list[bytes]:
        raise NotImplementedError

    def run(self, data: bytes) -> None:
        raise NotImplementedError


class ImageTarget(Target):
    def seeds(self) -> list[bytes]:
        import io

        from PIL import Image

        rng = np.random.default_rng(0)
        rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), "RGB")
        out = []
        for mode in ("RGB", "L", "P", "RGBA", "I;16", "I", "F", "1", "LA", "CMYK"):
            for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"):
                buf = io.BytesIO()
                try:
                    rgb.convert(mode).save(buf, format=fmt)
                except (OSError, ValueError, KeyError):
                    continue
                out.append(buf.getvalue())
        return out

    def run(self, data: bytes) -> None:
        from clad.data.io import load_image, load_mask
        from clad.errors import CladError

        try:  # the upload decoder of the station (only its formats), then the file decoder
            self.run_upload(data)
        except CladError:
            pass
        path = self.work / "input.png"
        path.write_bytes(data)
        a = load_image(path)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
            raise AssertionError(f"load_image returned {a.dtype} {a.shape}")
        m = load_mask(path)
        if m.dtype != bool or m.shape != a.shape[:2]:
            raise AssertionError(f"load_mask returned {m.dtype} {m.shape} for an image of {a.shape}")

    def run_upload(self, data: bytes) -> None:
        from clad.data.io import decode_image

        a, _ = decode_image(data)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
            raise AssertionError(f"decode_image returned {a.dtype} {a.shape}")


class ModelTarget(Target):
    def __init__(self, work: Path):
        super().__init__(work)
        import clad

        rng = np.random.default_rng(0)
        refs = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
        self.image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        self.files = {}
        for name in MODELS:
            det = clad.create_detector(name, backbone="tiny_cnn", image_size=32).fit(refs)
            folder = det.save(work / "seed" / name)
            self.files[name] = {f: (folder / f).read_bytes() for f in ("config.json", "model.safetensors")}
        self.folder = work / "model"
        self.folder.mkdir()

    def seeds(self) -> list[bytes]:
        out = []
        for i, name in enumerate(MODELS):
            for j, what in enumerate(MUTATED):
                key = "config.json" if what == "config" else "model.safetensors"
                out.append(bytes([i * len(MUTATED) + j]) + self.files[name][key])
            # the same config as format 1 (no checksums), so that the unverified path is fuzzed too
            doc = json.loads(self.files[name]["config.json"])
            doc = {k: v for k, v in doc.items() if k not in ("tensors", "sha256", "fit_sha256")} | {"format_version": 1}
            out.append(bytes([i * len(MUTATED)]) + json.dumps(doc, indent=2).encode())
        return out

    def run(self, data: bytes) -> None:
        import clad

        if not data:
            return
        name, what = MODELS[data[0] % (len(MODELS) * len(MUTATED)) // len(MUTATED)], MUTATED[data[0] % len(MUTATED)]
        files = dict(self.files[name])
        if what == "config":
            files["config.json"] = data[1:]
        else:
            files["model.safetensors"] = data[1:]
            if what == "state+sha256":
                doc = json.loads(files["config.json"])
                doc["sha256"] = hashlib.sha256(data[1:]).hexdigest()
                files["config.json"] = json.dumps(doc).encode()
        for f, content in files.items():
            (self.folder / f).write_bytes(content)
        result = clad.load_detector(self.folder).predict([self.image])
        if result.scores.shape != (1,) or result.anomaly_maps[0].shape != self.image.shape[:2]:
            raise AssertionError(f"predict returned scores {result.scores.shape}, map {result.anomaly_maps[0].shape}")


class Recorder:
    """Counts inputs and their outcomes, and keeps the first input of each distinct finding (exception type and
    where it arose)."""

    def __init__(self, target: Target, out: Path, name: str, engine: str):
        self.target, self.out, self.name, self.engine = target, out, name, engine
        self.tried, self.findings, self.start, self.saved = 0, {}, time.time(), 0.0
        self.outcomes = collections.Counter()  # "ok", or the kind of CladError
        from clad.errors import CladError  # here: clad is imported (and instrumented) by run_child first

        self.clean = CladError

    def __call__(self, data: bytes) -> None:
        self.tried += 1
        if time.time() - self.saved > 2:
            self.save()  # often: libFuzzer ends the process without running Python's exit handlers
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns about damaged files; warnings are not findings
                self.target.run(data)
            self.outcomes["ok"] += 1
        except self.clean as e:  # a clean refusal: counted by its kind, the message's start without the path
            kind = re.sub(r"'[^']*'", "'*'", re.sub(r"^/[^:]*: ", "", str(e)))  # without the path and names
            self.outcomes[f"{type(e).__name__}: {kind[:40]}"] += 1
        except Exception as e:  # noqa: BLE001 - the point: anything that is not a CladError
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if "/clad/" in f.filename] or frames
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
            key = f"{type(e).__name__} at {where}"
            if key not in self.findings:
                path = self.out / f"{self.name}-finding-{len(self.findings) + 1}.bin"
                path.write_bytes(data)
                self.findings[key] = {"message": str(e)[:300], "input": str(path), "count": 0,
                                      "traceback": "".join(traceback.format_exception(e))[-3000:]}
                print(f"\nFINDING {key}: {str(e)[:200]}", file=sys.stderr, flush=True)
            self.findings[key]["count"] += 1
            self.save()

    def save(self) -> None:
        self.saved = time.time()
        summary = {"target": self.name, "engine": self.engine, "inputs": self.tried,
                   "seconds": round(self.saved - self.start, 1), "findings": self.findings,
                   "outcomes": dict(self.outcomes.most_common())}
        (self.out / f"{self.name}-summary.json").write_text(json.dumps(summary, indent=2))


def _mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One random change: flip bits, overwrite, insert or delete bytes, truncate, or splice with another seed."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice((0, 255, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del b[i : i + rng.randint(1, 16)]
        elif op == 4:
            del b[i:]
        else:
            other = rng.choice(seeds)
            b[i:] = other[rng.randrange(len(other) + 1):]
    return bytes(b)


def run_child(name: str, seconds: float, out: Path) -> None:
    """Fuzz one target in this process for ``seconds``; writes ``out/NAME-summary.json``."""
    torch.set_num_threads(1)
    _instrumented_imports()
    with tempfile.TemporaryDirectory() as tmp:
        target = (ImageTarget if name == "image" else ModelTarget)(Path(tmp))
        seeds = target.seeds()
        engine = "atheris (libFuzzer, coverage-guided)" if atheris else "random mutation (atheris is not installed)"
        recorder = Recorder(target, out, name, engine)
        if atheris is not None:
            corpus = out / f"corpus-{name}"
            corpus.mkdir(exist_ok=True)
            for s in seeds:
                (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)
            longest = max(map(len, seeds))  # whole model files from the start, not libFuzzer's slowly growing limit
            atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={int(seconds)}", "-timeout=60",
                           f"-max_len={longest + 4096}", "-len_control=0",
                           # One allocation over 2 GB is a finding; the process as a whole may grow further, as
                           # many large legal images (e.g. a 14085 x 1536 GIF) fragment its heap.
                           "-malloc_limit_mb=2048", "-rss_limit_mb=12288", f"-artifact_prefix={out}/{name}-", "-print_final_stats=1"], recorder)
            atheris.Fuzz()  # ends the process when the time is up
        rng = random.Random(0)
        for s in seeds:
            recorder(s)
        end = time.time() + seconds
        while time.time() < end:
            recorder(_mutate(rng.choice(seeds), rng, seeds))
        recorder.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=TARGETS + ("all",), default="all")
    p.add_argument("--seconds", type=float, default=60, help="time budget per target (default 60)")
    p.add_argument("--out", default="runs/fuzz", help="findings, corpora and summaries (default runs/fuzz)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_child(args.target, args.seconds, out)
        return 0
    found = False
    for name in TARGETS if args.target == "all" else (args.target,):
        log = out / f"{name}.log"
        with open(log, "w") as fh:  # libFuzzer's progress lines go to the log
            child = [sys.executable, __file__, "--child", "--target", name, "--seconds", str(args.seconds),
                     "--out", str(out)]
            code = subprocess.call(child, stdout=fh, stderr=subprocess.STDOUT)
        summary = json.loads((out / f"{name}-summary.json").read_text())
        executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", log.read_text())
        if executed:  # libFuzzer's own count, exact to the end (the summary is saved every 2 s)
            summary["inputs"] = int(executed[1])
        artifacts = sorted(p.name for kind in ("crash", "timeout", "oom") for p in out.glob(f"{name}-{kind}-*"))
        print(f"{name}: {summary['inputs']} inputs in {summary['seconds']} s ({summary['engine']}), "
              f"{len(summary['findings'])} distinct finding(s), exit {code}; log {log}")
        top = list(summary["outcomes"].items())[:8]  # as of the last save, at most 2 s before the end
        print("  most frequent outcomes: " + "; ".join(f"{k} x{v}" for k, v in top))
        for key, f in summary["findings"].items():
            print(f"  {key} (x{f['count']}): {f['message'][:160]}  [{f['input']}]")
        for a in artifacts:
            print(f"  libFuzzer artifact (crash, timeout or out of memory): {out / a}")
        found |= bool(summary["findings"] or artifacts)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
