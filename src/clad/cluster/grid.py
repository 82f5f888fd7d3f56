"""The benchmark grid as Ray tasks (``clad bench --engine ray``).

``RayGrid`` knows nothing of the bench: it runs a function over a list of argument tuples as Ray tasks that each
declare ``cpus_per_task`` CPUs, and yields each result as its task finishes. What a task does (a group of runs
sharing a fit), the cache, the records and the outputs are ``clad.bench.runner``'s, the same as for the local
engine. Tasks are not retried (``max_retries=0``): like a local run, a failure is recorded and the next
invocation tries again.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

from clad.cluster import cluster_cpus, connect
from clad.errors import SpecError


def _call(fn: Callable, *args):
    """The one remote function: ``fn`` travels as an argument, so it may be any importable callable."""
    return fn(*args)


class RayGrid:
    """A connection to a Ray cluster (``clad.cluster.connect``) for running tasks of ``cpus_per_task`` CPUs.

    ``close`` ends the connection made here, if one was (a local cluster started here stops with it; a cluster
    joined with ``address`` goes on); a connection that was already open is left as it is. ``cpus_per_task``
    more than any node has is an error now rather than a task that waits for ever.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: int = 1):
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
            raise SpecError(f"--cpus-per-run must be an integer >= 1, got {cpus_per_task!r}")
        from clad.cluster import require_ray

        started = not require_ray("--engine ray").is_initialized()
        t0 = time.perf_counter()
        self.ray = connect(address, num_cpus)  # keeps the bench's own SIGINT/SIGTERM handlers
        self.startup_seconds = time.perf_counter() - t0
        self._owned = started
        self.cpus_per_task = cpus_per_task
        biggest = max((n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")), default=0)
        if cpus_per_task > biggest:
            self.close()
            raise SpecError(f"--cpus-per-run {cpus_per_task}: no node of the Ray cluster has that many CPUs "
                            f"(the biggest has {biggest:g}); a task would wait for ever")
        self.description = {"name": "ray", "address": address, "cluster_cpus": cluster_cpus(self.ray),
                            "cpus_per_run": cpus_per_task}

    def run(self, fn: Callable, tasks: Sequence[tuple], poll_seconds: float = 0.5
            ) -> Iterator[tuple[int, object, BaseException | None]]:
        """``fn(*tasks[k])`` for every k as a Ray task; yields ``(k, result, None)`` or ``(k, None, error)`` as
        each finishes, in the order they finish.

        Interrupted (KeyboardInterrupt, e.g. Ctrl-C or SIGTERM under ``stop_on_signals``): the results already
        finished are yielded, the other tasks cancelled, and the interrupt raised again. A consumer that stops
        early also cancels what is left.
        """
        ray = self.ray
        remote = ray.remote(_call).options(num_cpus=self.cpus_per_task, max_retries=0)
        index = {remote.remote(fn, *args): k for k, args in enumerate(tasks)}
        waiting = list(index)
        try:
            while waiting:
                # a short timeout: the driver stays responsive to a signal while tasks run
                done, waiting = ray.wait(waiting, num_returns=1, timeout=poll_seconds)
                for ref in done:
                    yield self._result(index[ref], ref)
        except KeyboardInterrupt:
            done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0) if waiting else ([], [])
            self._cancel(waiting)
            waiting = []
            for ref in done:
                yield self._result(index[ref], ref)
            raise
        finally:
            self._cancel(waiting)

    def _result(self, k: int, ref) -> tuple[int, object, BaseException | None]:
        try:
            return k, self.ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - a task that raised (or died) is the caller's failed record
            return k, None, e

    def _cancel(self, refs) -> None:
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001,S110 - already finished or gone: nothing left to stop
                pass

    def close(self) -> None:
        """End the connection if this object made it."""
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False
