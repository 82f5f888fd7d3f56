"""What a run measures besides its accuracy: the machine, peak memory, and the bare backbone's time."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Sequence

from clad.bench.files import read_json, write_json
from clad.bench.plan import Run


def machine() -> dict:
    """Versions (clad.evaluate.environment) plus what the timings depend on: OS, CPUs, torch threads (a Ray task
    has as many as its CPUs), accelerator."""
    import torch

    from clad.evaluate import environment

    env = environment()
    env.update(platform=platform.platform(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(),
               cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return env


def _rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak RSS while inside ``phase()`` blocks, sampled every ``interval`` s by a background thread.

    ``growth_mb``: the highest RSS seen during any phase minus the RSS just before the first phase. Where /proc is
    missing, the growth of ``ru_maxrss`` (the process high-water mark) is used instead, which reads 0 when an
    earlier run of the same process went higher. ``cuda_mb``: torch.cuda.max_memory_allocated over the phases.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = self.peak = None
        self._active = False
        self._stop = threading.Event()
        self._thread = None
        self._maxrss0 = None

    def __enter__(self):
        import resource

        import torch

        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval):
            if self._active:
                self._see()

    def _see(self):
        rss = _rss_bytes()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def phase(self):
        meter = self

        class _Phase:
            def __enter__(self):
                if meter.baseline is None:
                    meter.baseline = _rss_bytes()
                meter._see()
                meter._active = True

            def __exit__(self, *exc):
                meter._see()
                meter._active = False

        return _Phase()

    def result(self) -> dict:
        import resource

        import torch

        if self.baseline is not None and self.peak is not None:
            growth, how = (self.peak - self.baseline) / 2**20, "sampled RSS"
        else:  # ru_maxrss is KiB on Linux
            growth, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0) / 1024, "ru_maxrss"
        return {
            "peak_rss_growth_mb": growth,
            "peak_rss_mb": None if self.peak is None else self.peak / 2**20,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if self._cuda else None,
            "memory_method": how,
        }


class MeasuredDetector:
    """The detector as ``evaluate`` sees it, with fit and predict inside the memory meter's phases."""

    def __init__(self, detector, meter: PeakMemory):
        self._detector, self._meter = detector, meter

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def fit(self, images):
        with self._meter.phase():
            self._detector.fit(images)
        return self

    def predict(self, images, **kwargs):
        with self._meter.phase():
            return self._detector.predict(images, **kwargs)


def time_backbone(spec: str, image_size: int | None, images: Sequence, batch_size: int = 16) -> dict:
    """The bare backbone's preprocess + forward over ``images`` at ``image_size``, batch ``batch_size``.

    One untimed warm-up batch first (the detector's backbone is already warm from fit). Returns ms per image.
    """
    import torch

    from clad.registry import create_backbone

    bb = create_backbone(spec)
    size = image_size or bb.default_size
    cuda = bb.device.type == "cuda"
    with torch.inference_mode():
        bb(bb.preprocess(images[:batch_size], size))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            bb(bb.preprocess(images[i : i + batch_size], size))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"backbone": spec, "image_size": size, "batch_size": batch_size, "n_images": len(images),
            "ms_per_image": 1000.0 * seconds / max(1, len(images))}


def backbone_time(run: Run, spec: str, image_size: int | None, images: Sequence, batch_size: int, cache: dict,
                  cache_dir: Path | None) -> dict:
    """``time_backbone`` of one (dataset, category, backbone, size, batch), measured once and cached in ``cache``
    and in ``cache_dir`` (one JSON file per key) for later runs and later invocations.

    The backbone's time belongs to the code and machine that measured it: a cached time from another version
    (say, before a faster backbone) would make every ratio wrong, so ``machine()`` is part of the key.
    A failed measurement is recorded with its error and ``ms_per_image`` None (the run still counts).
    """
    key = hashlib.sha256(
        json.dumps([run.dataset, run.category, spec, image_size, batch_size, machine()], sort_keys=True,
                   default=str).encode()
    ).hexdigest()[:16]
    bt = cache.get(key)
    if bt is None and cache_dir is not None:
        bt = read_json(cache_dir / f"{key}.json")
    if bt is None:
        try:
            bt = time_backbone(spec, image_size, images, batch_size)
        except Exception as e:  # noqa: BLE001 - the ratio is then missing, the run still counts
            bt = {"backbone": spec, "image_size": image_size, "ms_per_image": None, "error": f"{type(e).__name__}: {e}"}
        if cache_dir is not None:
            write_json(cache_dir / f"{key}.json", dict(bt, dataset=run.dataset, category=run.category))
    cache[key] = bt
    return bt
