"""``cq convert --executor ray``: the per-tensor work as Ray tasks, the writer here.

Each tensor is one Ray task (``convert_tensor``) that asks for ``cpus`` CPUs
and ``gpus`` GPUs. Its result (the stored tensors and the report line) comes
back to this process, where cq's one writer puts it in file order; at most
``in_flight`` tasks run at once, and each tensor's bytes count against cq's
memory budget until written, so the driver's memory stays a small multiple
of the largest tensor. Ray reruns a task whose worker or node died (up to
``retries`` times); the work is a pure function of the tensor, its options
and its statistics, so a rerun gives the same bytes. A task that fails on
its data (a NaN weight, a format's refusal) is not retried: its error is
cq's own sentence, naming the tensor.

Two ways for a task to get its tensor (``transport``):

- ``shared-file`` (the default, the usual cluster): the worker reads the
  tensor's bytes and the layer's calibration statistics from the input and
  the statistics file itself, at the same absolute paths as this process
  (a shared filesystem: NFS, Lustre, a mounted bucket).
- ``object-store``: this process reads them and ships them through Ray's
  object store, for workers that do not see the files.

A tensor assembled from several (a fused diffusers layer) is always read
here and shipped. Ray's own documentation: https://docs.ray.io/en/latest/ray-core/fault_tolerance/tasks.html
(retries), .../ray-core/objects.html (the object store).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Mapping
from typing import Any

import torch

from cq_core import Conversion, CqError, ExecutionSettings, Executor, Option, PortableTensor, TensorJob, UsageError

TRANSPORTS = ("shared-file", "object-store")
DEVICES = ("auto", "cpu", "cuda")
#: Seconds to wait for a cluster's address to answer before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


def convert_tensor(
    job: TensorJob,
    tensor: PortableTensor | None,
    stats: Mapping[str, torch.Tensor] | None,
    device_type: str,
    threads: int,
    read_here: bool,
) -> Any:
    """The Ray task: one tensor's work on a worker; returns the job's outcome.

    ``tensor`` None: read it from the input on this machine (``shared-file``);
    ``read_here``: read the layer's statistics from the calibration file here
    too. ``device_type`` ``cuda`` is the GPU Ray assigned to this task (Ray sets
    ``CUDA_VISIBLE_DEVICES``).
    """
    torch.set_num_threads(threads)
    device = torch.device(device_type)
    try:
        weight = job.load(pin=device.type == "cuda") if tensor is None else tensor.tensor()
    except CqError as exc:
        raise CqError(
            f"{str(exc).removesuffix('.')} on Ray node {socket.gethostname()}; where the workers do not share "
            "the input's filesystem, pass --executor-option transport=object-store."
        ) from None
    if read_here:
        stats = job.statistics()
    return job.run(weight, device, stats)


class RayExecutor(Executor):
    name = "ray"
    description = "Ray tasks on a cluster (--ray-address) or a local Ray instance; needs the 'ray' package"
    options = (
        Option("address", str, None, "the Ray cluster: HOST:PORT, ray://HOST:PORT or auto; none starts a local "
               "Ray instance", flag="--ray-address"),
        Option("transport", str, "shared-file", "how a task gets its tensor: shared-file (workers read the input "
               "at the same path) or object-store (this process reads it and ships it)", choices=TRANSPORTS),
        Option("in_flight", int, None, "tensors in flight at once (bounds this process's memory); default: "
               "the task slots the cluster has", positive=True),
        Option("cpus", float, None, "CPUs each task asks Ray for (and torch threads it uses); default: "
               "--threads, else 1", positive=True),
        Option("gpus", float, None, "GPUs each task asks Ray for; default: 1 with --device cuda, or with "
               "--device auto when the cluster has GPUs; else 0"),
        Option("retries", int, 3, "times Ray reruns a task whose worker or node died"),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ray: Any = None
        self._started_ray = False
        self._pending: set[Any] = set()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._gpus = 0.0
        self._cpus = 1.0
        self._in_flight = 1

    def start(self, settings: ExecutionSettings) -> None:
        device = settings.device or "auto"
        if device not in DEVICES:
            raise UsageError(
                f"--device {device} picks a device of this machine; with --executor ray, Ray gives each task "
                "its GPU: pass --device cuda, cpu or auto."
            )
        if self.opts["retries"] < 0:
            raise UsageError(f"Option 'retries' of executor 'ray' must be 0 or more, not {self.opts['retries']}.")
        try:
            import ray
        except ImportError:
            raise CqError(
                "--executor ray needs the 'ray' package, which is not installed here: pip install 'ray>=2.60'."
            ) from None
        self._ray = ray
        address = self.opts["address"]
        if address not in (None, "auto"):
            check_reachable(address)
        if not ray.is_initialized():
            local = {"include_dashboard": False} if address is None else {}
            level = logging.ERROR if settings.quiet else logging.WARNING
            with _ray_logging_at(level), _signals_deferred() as received:  # Ray warns before init applies logging_level
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=level, **local)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    ray.shutdown()  # whatever part of a local instance had started
                    where = f"--ray-address {address}" if address else "a local Ray instance"
                    raise CqError(f"{where}: Ray could not start or connect ({_first_line(exc)}).") from None
                except BaseException:
                    ray.shutdown()
                    raise
                self._started_ray = True
            if received:  # a SIGTERM or SIGHUP while Ray started: now cq's own handler, with Ray to stop
                received.pop(0)()
        resources = ray.cluster_resources()
        gpus = self.opts["gpus"]
        if gpus is None:
            gpus = 1.0 if device == "cuda" or (device == "auto" and resources.get("GPU", 0) > 0) else 0.0
        if gpus < 0 or (device == "cuda" and gpus == 0):
            raise UsageError(f"Option 'gpus' of executor 'ray' must be more than 0 with --device cuda, not {gpus}.")
        if gpus > resources.get("GPU", 0):
            raise CqError(
                f"The Ray cluster has {resources.get('GPU', 0):g} GPUs, fewer than the {gpus:g} each task asks "
                "for; pass --device cpu, or add GPU nodes."
            )
        self._gpus = gpus
        self._cpus = self.opts["cpus"] or settings.threads or 1
        slots = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / self._cpus
        self._in_flight = self.opts["in_flight"] or max(1, int(slots))

    def run(self, conversion: Conversion) -> None:
        ray = self._ray
        retries = self.opts["retries"]
        task = ray.remote(convert_tensor).options(
            num_cpus=self._cpus, num_gpus=self._gpus, max_retries=retries, retry_exceptions=False
        )
        ship = self.opts["transport"] == "object-store"
        device_type = "cuda" if self._gpus else "cpu"
        threads = max(1, int(self._cpus))

        def read(job: TensorJob) -> PortableTensor | None:
            return PortableTensor.of(conversion.read(job)) if ship or job.location is None else None

        def work(job: TensorJob, tensor: PortableTensor | None) -> Any:
            ref = task.remote(job, tensor, job.statistics() if ship else None, device_type, threads, not ship)
            del tensor  # in the object store now
            with self._lock:
                self._pending.add(ref)
            try:
                return ray.get(ref)
            except BaseException as exc:
                if isinstance(exc, ray.exceptions.RayTaskError):  # raised by cq in the task: its own sentence
                    exc = exc.cause
                elif isinstance(exc, ray.exceptions.RayError):  # lost more than `retries` times
                    exc = CqError(
                        f"Tensor {job.name!r}: its Ray task was lost {retries + 1} times "
                        f"({type(exc).__name__}: {_first_line(exc)})."
                    )
                with self._lock:  # the first failure is the one every thread reports
                    self._failure = self._failure or exc
                    failure = self._failure
                # The conversion stops: the other threads' tasks are cancelled instead of awaited
                # (Ctrl-C, or another tensor's error, would otherwise wait for them).
                self._cancel_pending()
                raise failure from None
            finally:
                with self._lock:
                    self._pending.discard(ref)

        conversion.stream(work, workers=self._in_flight, read=read)

    def _cancel_pending(self) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for ref in pending:  # the cluster should not keep working for nothing
            self._ray.cancel(ref)

    def stop(self) -> None:
        if self._ray is None:
            return
        self._cancel_pending()
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


def check_reachable(address: str) -> None:
    """Refuse an address nothing answers at, in one sentence, before Ray retries it for a minute."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto.")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CqError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            "'ray start --head', or leave the address out for a local Ray instance."
        ) from None


#: Signals cq turns into a clean stop (cq_core/cli/app.py): Ray must not take them over.
_GUARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred():
    """While Ray starts: SIGTERM and SIGHUP are held, not acted on, and Ray cannot install its
    own handlers for them; after, cq's handlers are back (also over the handler Ray's native core
    worker installs, which prints a stack dump and aborts). Yields a list that, when a signal
    came, holds a function calling cq's handler for it (the caller runs it once Ray is up, so
    that stopping Ray is part of cq's clean stop).

    Ray's ``ray.init`` replaces SIGTERM's handler twice (``sys.exit(15)`` before it connects,
    then kill-its-processes-and-``sys.exit(1)``): a SIGTERM then left the driver with exit 15
    and no message, and Ray's agents orphaned (``ray/_private/worker.py``, ``ray/_private/node.py``)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    saved = {sig: signal.getsignal(sig) for sig in _GUARDED}
    received: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        handler = saved.get(signum)
        if callable(handler) and not received:
            received.append(lambda: handler(signum, None))

    real_signal = signal.signal

    def guarded_signal(signum: int, handler: Any) -> Any:
        if signum in saved:  # Ray's handler: keep holding; cq's comes back after
            return hold
        return real_signal(signum, handler)

    for sig in saved:
        real_signal(sig, hold)
    signal.signal = guarded_signal
    try:
        yield received
    finally:
        signal.signal = real_signal
        for sig, handler in saved.items():
            real_signal(sig, handler if handler is not None else signal.SIG_DFL)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _ray_logging_at(level: int):
    """Ray's own loggers (``ray`` and below) at ``level`` while Ray starts, as they were after:
    ``ray.init`` logs the cluster's security setup before it applies its ``logging_level``."""
    logger = logging.getLogger("ray")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
