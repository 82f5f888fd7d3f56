"""The streaming predict flow: decode a source lazily, predict in batches, hand each batch to the sinks.

Decoding runs in a background thread (``prefetch`` batches ahead, through a bounded queue) while the detector
runs its forward on the batch before, so at most ``prefetch + 2`` batches of decoded images are in memory
whatever the size of the source. A file that cannot be decoded goes to every sink's ``write_error`` and the
stream goes on; any other error stops the run (and the thread) and is raised after the sinks are closed. An
interruption (KeyboardInterrupt, or ``Interrupted`` on SIGTERM) also stops it: the sinks keep what was finished.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from clad.errors import CladError, SpecError
from clad.pipeline.outputs import uninterrupted
from clad.pipeline.sinks import Sink
from clad.pipeline.sources import Entry
from clad.types import Item, Prediction

# (decoded items, [(path, error message)] of the entries that failed)
Batch = tuple[list[Item], list[tuple[str, str]]]


@dataclass
class Summary:
    """What a run did. n_flagged: images labelled anomalous (with a threshold); seconds: the whole run;
    predict_seconds: inside ``detector.predict`` (the forward); decode_seconds: decoding (in the prefetch thread,
    overlapping the forward); error: what stopped the run early."""

    n_scored: int = 0
    n_skipped: int = 0
    n_flagged: int = 0
    seconds: float = 0.0
    predict_seconds: float = 0.0
    decode_seconds: float = 0.0
    error: BaseException | None = None

    @property
    def interrupted(self) -> bool:
        return isinstance(self.error, KeyboardInterrupt)

    @property
    def kept(self) -> bool:
        """Whether sinks keep their outputs: the run ended, or was interrupted (what was finished is kept); a run
        stopped by an error leaves the previous outputs as they were."""
        return self.error is None or self.interrupted

    @property
    def images_per_second(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0


class _Decoder:
    """Decodes entries into batches of ``batch_size`` good images; failures travel with the batch they were met in
    (on their own once ``batch_size`` of them gather, so a folder of bad files cannot grow one batch)."""

    def __init__(self, entries: Iterable[Entry], batch_size: int):
        self.entries, self.batch_size, self.seconds = entries, batch_size, 0.0
        self.stop = threading.Event()

    def __iter__(self) -> Iterator[Batch]:
        items, failures = [], []
        for entry in self.entries:
            if self.stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                items.append(entry.load())
            except CladError as e:
                failures.append((entry.path, str(e)))
            self.seconds += time.perf_counter() - t0
            if len(items) == self.batch_size:
                yield items, failures
                items, failures = [], []
            elif len(failures) >= self.batch_size:
                yield [], failures
                failures = []
        if items or failures:
            yield items, failures


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Prefetcher:
    """Iterates the batches of a ``_Decoder`` decoded in a background thread, at most ``depth`` ready batches ahead.

    ``close`` stops the thread (the consumer calls it when it stops early or fails); an error raised while
    decoding is raised again by the iteration.
    """

    def __init__(self, decoder: _Decoder, depth: int):
        self.decoder = decoder
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.thread = threading.Thread(target=self._fill, name="clad-prefetch", daemon=True)

    def _put(self, value) -> bool:
        while not self.decoder.stop.is_set():
            try:
                self.queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self.decoder:
                if not self._put(batch):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Raised(e))

    def __iter__(self) -> Iterator[Batch]:
        self.thread.start()
        while True:
            value = self.queue.get()
            if value is _DONE:
                return
            if isinstance(value, _Raised):
                raise value.error
            yield value

    def close(self) -> None:
        self.decoder.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        while not self.queue.empty():  # let the decoded images go
            self.queue.get_nowait()


class Pipeline:
    """Predict a source of images in batches and hand each batch to ``sinks``.

    detector: fitted (``predict(images, batch_size)``, ``threshold_``); sinks: ``clad.pipeline.sinks``; batch_size:
    images per forward; prefetch: batches decoded ahead in a background thread (0: decode in the caller's thread,
    between forwards); explainer: a fitted ``clad.explain.Explainer`` whose explanations ride on each prediction.
    """

    def __init__(self, detector, sinks: Sequence[Sink] = (), batch_size: int = 16, prefetch: int = 2,
                 explainer=None, progress: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise SpecError(f"prefetch must be an integer >= 0, got {prefetch!r}")
        self.detector, self.sinks, self.batch_size, self.prefetch = detector, list(sinks), batch_size, prefetch
        self.explainer, self.progress = explainer, progress

    def run(self, source: Iterable[Entry]) -> Summary:
        """Stream ``source`` through the detector into the sinks; returns the run's ``Summary``.

        Every sink opened is closed, with the summary (its ``error`` set when the run stopped early), in order and
        out of reach of an interruption (``outputs.uninterrupted``); a sink's ``write`` of a batch comes after
        those of the sinks before it, so the last sink records only what the others finished.
        """
        summary = Summary()
        decoder = _Decoder(source, self.batch_size)
        batches = Prefetcher(decoder, self.prefetch) if self.prefetch else decoder

        def predicted() -> Iterator[tuple[list[Prediction], list[tuple[str, str]]]]:
            for items, failures in batches:
                yield (self._predict(items, summary) if items else []), failures

        def stop() -> None:
            if isinstance(batches, Prefetcher):
                batches.close()
            summary.decode_seconds = decoder.seconds

        total = len(source) if hasattr(source, "__len__") else None
        return self._deliver(predicted(), total, summary, stop)

    def deliver(self, stream: Iterable[tuple[list[Prediction], list[tuple[str, str]]]],
                total: int | None = None) -> Summary:
        """Hand batches predicted elsewhere (another engine: ``clad.cluster.data``) to the sinks as ``run`` does:
        ``stream`` yields (predictions, [(path, error)] of the files that could not be used); its ``close``, when
        it has one, is called when the run ends or stops. total: the images to come, for the progress bar."""
        close = getattr(stream, "close", None)
        return self._deliver(iter(stream), total, Summary(), close)

    def _deliver(self, stream: Iterator, total: int | None, summary: Summary, stop=None) -> Summary:
        t0 = time.perf_counter()
        opened = []
        try:
            for sink in self.sinks:
                sink.open()
                opened.append(sink)
            with tqdm(total=total, desc="predict", unit="image", disable=not self.progress, leave=False) as bar:
                for batch, failures in stream:
                    for path, error in failures:
                        for sink in self.sinks:
                            sink.write_error(path, error)
                    summary.n_skipped += len(failures)
                    if batch:
                        for sink in self.sinks:
                            sink.write(batch)
                        summary.n_scored += len(batch)
                        summary.n_flagged += sum(p.label is True for p in batch)
                    bar.update(len(batch) + len(failures))
        except BaseException as e:
            summary.error = e
            raise
        finally:
            with uninterrupted():
                if stop is not None:
                    stop()
                summary.seconds = time.perf_counter() - t0
                _close(opened, summary)
        return summary

    def _predict(self, items: list[Item], summary: Summary) -> list[Prediction]:
        images = [it.image for it in items]
        t0 = time.perf_counter()
        result = self.detector.predict(images, batch_size=len(images))
        summary.predict_seconds += time.perf_counter() - t0
        explanations = [None] * len(items)
        if self.explainer is not None:
            explanations = self.explainer.explain(images, result, paths=[it.path for it in items])
        labels, normalized = result.labels, result.normalized_scores
        return [Prediction(item, float(result.scores[i]), result.anomaly_maps[i],
                           None if labels is None else bool(labels[i]), explanations[i],
                           None if normalized is None else float(normalized[i]))
                for i, item in enumerate(items)]


def _close(sinks: Sequence[Sink], summary: Summary) -> None:
    """Close every sink, even after one fails (then the run stopped on that error: the others discard theirs)."""
    failure = None
    for sink in sinks:
        try:
            sink.close(summary)
        except Exception as e:  # noqa: BLE001 - raised below, once every sink is closed
            if failure is None:
                failure = e
                if summary.error is None:
                    summary.error = e
    if failure is not None:
        raise failure
