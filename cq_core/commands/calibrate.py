"""``cq calibrate``: run a torch model the user names on their batches (or random tokens) and save
each Linear layer's input statistics (:mod:`cq_core.engine.capture` captures them,
:mod:`cq_core.io.calibration_file` is the file). ``cq convert --calibration FILE`` hands each
layer's entry to the optimizer as ``OptimizeContext.stats``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from cq_core.engine.capture import StatisticsCapture, random_token_batches, run_batches
from cq_core.errors import CqError, UsageError


def parse_token_range(spec: str) -> tuple[int, int]:
    """``--random-tokens`` as ``(low, high)``: ``HIGH`` (the vocabulary size) or ``LOW:HIGH``."""
    low_text, _, high_text = spec.rpartition(":")
    try:
        return int(low_text or 0), int(high_text)
    except ValueError:
        raise UsageError(f"--random-tokens {spec!r} must be VOCAB_SIZE or LOW:HIGH (token ids).") from None


def load_object(spec: str, flag: str) -> Any:
    """``package.module:attr`` or ``path/to/file.py:attr`` -> the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise UsageError(f"{flag} {spec!r} must look like MODULE:NAME or FILE.py:NAME.")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UsageError(f"{flag} {spec!r}: no such file {file}.")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{flag} {spec!r}: cannot import {module_name!r} ({exc}).") from None
    except UsageError:
        raise
    except SystemExit as exc:  # the user's code ended the program: cq would exit as it asked, with no file
        raise CqError(f"{flag} {spec!r}: importing {module_name!r} called sys.exit({exc.code!r}); cq stopped "
                      "without writing statistics.") from None
    except Exception as exc:  # the user's code failed while importing: say where, and what
        raise CqError(f"{flag} {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"{flag} {spec!r}: {module_name!r} has no {attr!r}.") from None


def _call(target: Any, what: str) -> Any:
    """``target()`` when it is callable, else ``target``; the user's code failing is one sentence."""
    if not callable(target) or isinstance(target, torch.nn.Module):
        return target
    try:
        return target()
    except SystemExit as exc:
        raise CqError(f"{what} called sys.exit({exc.code!r}); cq stopped without writing statistics.") from None
    except Exception as exc:
        raise CqError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def calibrate(
    model_spec: str,
    data_spec: str | None,
    output: str | os.PathLike,
    *,
    layers: str | None = None,
    prefix: str = "",
    device: str | None = None,
    random_tokens: str | None = None,
    first_token: int | None = None,
    last_token: int | None = None,
    sequences: int = 80,
    rank: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """What ``cq calibrate`` does: build the model from a ``MODULE:NAME`` callable and
    the batches from another (``data_spec``) or from random tokens
    (``random_tokens``: ``VOCAB_SIZE`` or ``LOW:HIGH``), capture (``rank``: bounded, see
    :class:`StatisticsCapture`), save; ``progress`` as :func:`run_batches`. Returns the
    statistics."""
    if (data_spec is None) == (random_tokens is None):
        raise UsageError("Pass either --data (your batches) or --random-tokens (data-free), not both or neither.")
    build_model = load_object(model_spec, "--model")
    model = _call(build_model, f"--model {model_spec!r}: building the model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {model_spec!r} did not give a torch.nn.Module.")
    if random_tokens is not None:
        low, high = parse_token_range(random_tokens)
        where = next((p.device for p in model.parameters()), torch.device("cpu"))
        batches = random_token_batches(
            low, high, sequences=sequences, first=first_token, last=last_token, device=where
        )
    else:
        make_batches = load_object(data_spec, "--data")
        batches = _call(make_batches, f"--data {data_spec!r}: making the batches")
        if not isinstance(batches, Iterable):
            raise UsageError(f"--data {data_spec!r} did not give an iterable of batches (it gave "
                             f"{type(batches).__name__}).")
    try:
        capture = StatisticsCapture(layers=layers, prefix=prefix, device=device, rank=rank)
        run_batches(capture, model, batches, progress=progress)
    except CqError as exc:
        if random_tokens is None:
            raise
        raise CqError(f"{exc} (--random-tokens calls model(input_ids=..., attention_mask=...)).") from exc
    capture.save(output)
    return capture.statistics()
