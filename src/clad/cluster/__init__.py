"""Running clad on Ray: batch scoring on Ray Data, the benchmark grid as Ray tasks, the station as Ray Serve
replicas. Needs the cluster extra (``pip install -e ".[cluster]"``).

Every front end connects the same way (``connect``): ``--address auto`` joins the cluster that ``ray start --head``
started on this machine, ``--address HOST:PORT`` (or ``ray://HOST:PORT``) a remote one, and no address starts a
local one for this run only, with ``--num-cpus`` CPUs (default: all of this machine's).
"""
from __future__ import annotations

import importlib

from clad.errors import DependencyError, SpecError

INSTALL = "pip install 'ray[data,serve]' (or pip install -e '.[cluster]')"


def add_engine_args(parser, local: str, ray: str, extra=None) -> None:
    """``--engine local|ray``, then ``extra(parser)`` (options of that front end's ray engine), ``--address`` and
    ``--num-cpus``: the same three options and words in ``predict``, ``bench`` and ``serve``. ``local`` and
    ``ray`` say what each engine does there. Imports no Ray."""
    from clad.specs import argument_type, parse_int

    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help=f"local (default: {local}) or ray ({ray}; needs pip install -e '.[cluster]')")
    if extra is not None:
        extra(parser)
    parser.add_argument("--address", help="--engine ray: the Ray cluster to join: auto (the one `ray start --head` "
                        "started on this machine), HOST:PORT or ray://HOST:PORT; without it, a local cluster for "
                        "this run only")
    parser.add_argument("--num-cpus", type=argument_type(parse_int, 1), metavar="N",
                        help="--engine ray without --address: the local cluster's CPUs (default: all of this "
                             "machine's)")


def require_ray(what: str):
    """Import ray, or one DependencyError line saying what needs it and how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise DependencyError(f"{what} needs the package 'ray', which is not installed: {INSTALL}") from e


def connect(address: str | None = None, num_cpus: int | None = None, what: str = "--engine ray"):
    """Join the Ray cluster at ``address`` ("auto", HOST:PORT, ray://HOST:PORT) or, without one, start a local
    cluster of ``num_cpus`` CPUs for this process; returns the ``ray`` module. Already connected: kept as it is.

    A cluster that cannot be reached is one error line naming the address and how to start one.
    """
    ray = require_ray(what)
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise SpecError(f"--num-cpus must be an integer >= 1, got {num_cpus!r}")
    if address is not None and num_cpus is not None:
        raise SpecError("--num-cpus sizes a local cluster started for this run; a cluster joined with --address "
                        "has the CPUs its nodes were started with (ray start --num-cpus N)")
    if ray.is_initialized():
        return ray
    if address is not None and address != "auto":
        _probe(address)
    kwargs = dict(include_dashboard=False, logging_level="warning", configure_logging=True)
    handlers = _signal_handlers()  # ray.init makes SIGTERM end the driver at once: clad's own handlers come back
    try:
        if address is None:  # node IP 127.0.0.1: its traffic stays on this machine (Ray listens on every interface)
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        _restore(handlers)
        where = "the local cluster" if address is None else f"the Ray cluster at {address!r}"
        hint = ("; start one with `ray start --head --num-cpus N` on the head node (and `ray start --address "
                "HEAD:6379` on the others), or leave out --address to start a local one for this run")
        raise DependencyError(f"cannot connect to {where}: {' '.join(str(e).split())}"
                              + (hint if address is not None else "")) from e
    _restore(handlers)
    return ray


def _signal_handlers() -> dict:
    """SIGINT's and SIGTERM's handlers now (none off the main thread, where they cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(handlers: dict) -> None:
    """Put back the handlers ``_signal_handlers`` saw (``clad.pipeline.stop_on_signals``: keep what is finished)."""
    import signal

    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes (Ray retries an unreachable GCS for long), when HOST:PORT takes no connection."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise DependencyError(f"cannot connect to the Ray cluster at {address!r}: {e.strerror or e}; start one with "
                              "`ray start --head --num-cpus N` on the head node, or leave out --address to start a "
                              "local one for this run") from e


def cluster_cpus(ray) -> int:
    """The CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
