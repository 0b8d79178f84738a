"""Where the per-tensor work runs: the executor contract.

``cq convert`` plans a conversion, writes the output header, then hands an
executor a :class:`Conversion`: one :class:`TensorJob` per tensor to write,
in file order. The work on one tensor is a pure function of the tensor, its
options and its calibration statistics (``TensorJob.run``), so it may run on
threads here (the built-in ``local`` executor), on GPUs, or on the machines
of a cluster (``cq_ray``): the bytes are the same wherever it runs.

An executor never writes: it calls :meth:`Conversion.stream`, which keeps the
one writer in this process, in file order, and charges every tensor's bytes
against a memory budget, so at most ``workers`` tensors are worked on at once
and memory stays a small multiple of the largest tensor whatever the model
size. The executor is not part of the recipe: it never changes the bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy
import torch

from cq_core.io.safetensors_io import TensorLocation
from cq_core.plugin.types import Configurable

__all__ = ["Conversion", "ExecutionSettings", "Executor", "PortableTensor", "TensorJob", "TensorLocation"]


@dataclass(frozen=True)
class PortableTensor:
    """A CPU tensor that pickles whatever its dtype: its bytes as a flat uint8 numpy array,
    with dtype and shape.

    Results and inputs cross processes pickled, and torch 2.13 pickles a float8
    tensor but cannot unpickle it (``torch/serialization.py`` ``persistent_load``
    asks ``UntypedStorage`` for a dtype). A numpy array also travels out of band
    (pickle protocol 5): Ray copies it into its object store once and the
    receiver maps it, where a torch tensor is serialized through ``torch.save``.
    ``PortableTensor.of(t).tensor()`` equals ``t`` bit for bit.
    """

    data: numpy.ndarray  # uint8, 1-D: the tensor's bytes in C order
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> PortableTensor:
        flat = tensor.contiguous().reshape(-1)
        return cls(flat.view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape))

    def tensor(self) -> torch.Tensor:
        # A mapped, read-only buffer (Ray's object store) is copied: torch tensors are writable.
        data = self.data if self.data.flags.writeable else self.data.copy()
        return torch.from_numpy(data).view(self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class ExecutionSettings:
    """The execution options of ``cq convert``, as given (none of them changes the bytes).

    ``device``: the ``--device`` request (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, or None for auto); ``threads``: ``--threads`` (None: the
    executor's default); ``pipelined``: overlap reading, work and writing
    (False: one stage after another, for tests and debugging); ``quiet``:
    ``-q``, the user wants errors only, so an executor keeps what it starts
    (a cluster, a library's logging) from printing warnings too.
    """

    device: str | None = None
    threads: int | None = None
    pipelined: bool = True
    quiet: bool = False


class TensorJob(Protocol):
    """One tensor's work, complete in itself; picklable, so it may run in another process.

    cq builds these (``cq_core.engine.execute.TensorJob``); executors only call them.
    """

    #: the tensor's name in the input
    name: str
    #: where its bytes lie, or None when only this process can produce it (a tensor
    #: assembled from several, e.g. a fused diffusers layer): read it with ``Conversion.read``
    location: TensorLocation | None

    def load(self, pin: bool = False) -> torch.Tensor:
        """Read the tensor from :attr:`location` on this machine (page-locked with ``pin``).

        Raises :class:`~cq_core.errors.CqError` naming the file when it cannot be read.
        """

    def statistics(self) -> Mapping[str, torch.Tensor] | None:
        """The layer's calibration statistics, read from the calibration file on this machine."""

    def run(self, tensor: torch.Tensor, device: torch.device, stats: Mapping[str, torch.Tensor] | None) -> Any:
        """The work: optimize and encode ``tensor`` on ``device``; returns the outcome that
        :meth:`Conversion.stream` writes (stored tensors on the CPU and the report line).
        Raises :class:`~cq_core.errors.CqError` naming the tensor for bad data."""


class Conversion(Protocol):
    """What an executor gets: the jobs, in write order, and the one ordered writer."""

    jobs: Sequence[TensorJob]
    settings: ExecutionSettings
    #: ``--device`` resolved on this machine (CUDA when available for ``auto``) for an
    #: executor whose :attr:`Executor.in_process` is True; None for the others.
    device: torch.device | None

    def read(self, job: TensorJob) -> torch.Tensor:
        """Read a job's tensor in this process (page-locked when :attr:`device` is CUDA)."""

    def stream(
        self,
        work: Callable[[TensorJob, torch.Tensor | None], Any],
        *,
        workers: int = 1,
        read: Callable[[TensorJob], torch.Tensor | None] | None = None,
    ) -> None:
        """Run every job: ``read`` (default :meth:`read`) on a reader thread, ``work(job, tensor)``
        on ``workers`` threads (the calling one first), the outcomes written in job order.

        ``work`` returns the job's outcome (``job.run``'s result), however it got it: computed
        here, or fetched from another process. At most ``workers`` jobs are worked on at
        once, and each job's bytes count against a budget from its read until its write, so
        memory stays bounded. With ``settings.pipelined`` False the stages run one after
        another on this thread. The first exception from any stage stops the rest and is
        re-raised here; nothing of the output stays behind.
        """


class Executor(Configurable, ABC):
    """Runs the per-tensor work of a conversion somewhere: threads here, a cluster, ...

    Subclasses set ``name`` (``cq convert --executor NAME``), ``description``
    and optionally ``options`` (``--executor-option KEY=VALUE``), and implement
    :meth:`run`. cq calls :meth:`start` before it creates the output, then
    :meth:`run` once, then :meth:`stop`, also after a failure.
    """

    kind: ClassVar[str] = "executor"
    description: ClassVar[str] = ""
    #: True when the work runs in this process: cq then resolves ``--device`` here
    #: (and refuses a device this machine lacks) into :attr:`Conversion.device`.
    in_process: ClassVar[bool] = False

    def start(self, settings: ExecutionSettings) -> None:
        """Get ready (connect to a cluster, check the device); nothing is written yet, so a
        failure here leaves no output. Raise :class:`~cq_core.errors.UsageError` for a bad
        option or setting, :class:`~cq_core.errors.CqError` for an unreachable resource,
        each one sentence naming it."""

    @abstractmethod
    def run(self, conversion: Conversion) -> None:
        """Run every job of ``conversion`` through :meth:`Conversion.stream` (which writes)."""

    def stop(self) -> None:
        """Release what :meth:`start` took (cancel outstanding work, disconnect)."""
