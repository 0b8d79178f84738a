"""The whole cq plugin contract: every hook cq calls, with what it means.

A plugin is a module (or object) with functions decorated by
:data:`cq_core.hookimpl` whose names match the hooks below. Ship it as a
distribution that declares an entry point in the ``cq`` group::

    [project.entry-points.cq]
    my_plugin = "my_package.plugin"

Registration hooks receive a ``register`` callback so one plugin can register
zero, one or many things. Names are global: registering a name that another
plugin already registered is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # imported for annotations only; the runtime contract is duck-typed
    from cq_core.plugin.draft import Migration
    from cq_core.plugin.executors import Executor
    from cq_core.plugin.layouts import LayoutConverter
    from cq_core.plugin.types import (
        Format,
        MetadataWriter,
        ModelFilter,
        Optimizer,
        ShapeRead,
    )

PROJECT = "cq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Registration: called once when the plugin manager is built.
# ---------------------------------------------------------------------------


@hookspec
def cq_register_formats(register: Callable[[type[Format]], None]) -> None:
    """Register quantization formats.

    :param register: call ``register(FormatClass)`` once per format. The class
        is a subclass of :class:`cq_core.plugin.types.Format`; its ``name`` is the
        exact ``format`` string ComfyUI reads from the layer metadata. cq
        instantiates it with the user's format options (``-O key=value``).
    """


@hookspec
def cq_register_optimizers(register: Callable[[type[Optimizer]], None]) -> None:
    """Register rounding optimizers.

    :param register: call ``register(OptimizerClass)`` once per optimizer; a
        subclass of :class:`cq_core.plugin.types.Optimizer`. Optimizers work through
        the format interface only (scales, rounding onto the grid, packing),
        so every optimizer serves every format.
    """


@hookspec
def cq_register_model_filters(register: Callable[[ModelFilter], None]) -> None:
    """Register model-family presets.

    :param register: call ``register(ModelFilter(...))`` once per preset. A
        preset names the layers of a model family that must stay in high
        precision and the tensors to drop from the output.
    """


@hookspec
def cq_register_metadata_writers(register: Callable[[type[MetadataWriter]], None]) -> None:
    """Register writers of per-layer quantization metadata.

    :param register: call ``register(WriterClass)``; a subclass of
        :class:`cq_core.plugin.types.MetadataWriter`. The writer decides which extra
        tensors and header entries carry each layer's JSON (ComfyUI's writer
        adds ``L.comfy_quant`` tensors and ``_quantization_metadata``).
    """


@hookspec
def cq_register_migrations(register: Callable[[type[Migration]], None]) -> None:
    """Register migrations from legacy checkpoint layouts to the current one.

    :param register: call ``register(MigrationClass)``; a subclass of
        :class:`cq_core.Migration`. ``cq migrate`` offers the input to
        every migration in registration order (built-ins first); each one
        that detects its layout rewrites the draft (renames, reshapes, layer
        configs), and cq streams the result out with both ComfyUI metadata
        carriers. The built-in ``scaled_fp8`` migration is the example.
    """


@hookspec
def cq_register_layout_converters(register: Callable[[LayoutConverter], None]) -> None:
    """Register checkpoint layouts that ComfyUI renames on load, with their map to its own layout.

    :param register: call ``register(converter)`` with an instance of a
        :class:`cq_core.plugin.layouts.LayoutConverter` subclass. Before planning,
        ``cq convert`` and ``cq verify`` offer the input's tensor names to each
        converter in registration order; the first whose ``detect`` accepts
        them presents the checkpoint under ComfyUI's names (tensors fused or
        transformed as its ``assemblies`` say), so quantization tensors land
        on the names ComfyUI keeps. ``cq_models`` registers the diffusers
        layouts ComfyUI 0.30 converts (``comfy/model_detection.py``
        ``convert_diffusers_mmdit``).
    """


@hookspec
def cq_register_executors(register: Callable[[type[Executor]], None]) -> None:
    """Register executors: where the per-tensor work of ``cq convert`` runs.

    :param register: call ``register(ExecutorClass)``; a subclass of
        :class:`cq_core.plugin.executors.Executor`, chosen with ``cq convert
        --executor NAME`` and instantiated with ``--executor-option KEY=VALUE``.
        An executor only decides where ``TensorJob.run`` runs (threads, GPUs,
        a cluster's machines); the writer stays one ordered stream in the
        calling process, so every executor writes the same bytes. Core
        registers ``local`` (threads of this process, or its CUDA device);
        ``cq_ray`` registers ``ray``.
    """


# ---------------------------------------------------------------------------
# Model detection: called per conversion, before planning.
# ---------------------------------------------------------------------------


@hookspec
def cq_detect_model(keys: Sequence[str], metadata: Mapping[str, str]) -> Any:
    """Name the components of a checkpoint you recognise and the preset for each, or return None.

    Called with the tensor names and the safetensors ``__metadata__`` of the
    input, before any tensor data is read. A checkpoint can hold several
    components under their own key prefixes (an all-in-one file: the
    diffusion model under ``model.diffusion_model.``, text encoders under
    ``text_encoders.<name>.``, the VAE under ``vae.``); a preset acts only
    inside its component's prefix, so nothing done for one component
    touches another.

    Every plugin is asked. Where two plugins claim overlapping prefixes (one
    starts with the other), the plugin called first wins (pluggy calls the
    most recently registered plugin first, so an installed package comes
    before the built-in ``cq-models``), except that a component whose preset
    keeps everything (``ModelFilter.keep_all``, a VAE) is never overridden.
    Return None unless the key set is clearly yours.

    :param keys: every tensor name in the input checkpoint.
    :param metadata: the input's ``__metadata__`` (may be empty).
    :return: a :class:`cq_core.plugin.types.Detection` (preset name, reason, and
        the component's ``prefix``; ``""`` claims the whole file), a list of
        them (one per component), or None.
    """


@hookspec
def cq_shape_read_layers(keys: Sequence[str], metadata: Mapping[str, str]) -> Mapping[str, ShapeRead | str] | None:
    """Name the tensors whose stored shape the model's loader reads to build the model.

    Called once per conversion, with the same arguments as
    :func:`cq_detect_model`, before planning. Every plugin's answer counts
    (the results are merged; for a name several plugins give, the first
    registered wins). A weight named here keeps the dimensions the loader
    reads: a format whose stored ``weight`` differs from (N, K) in one of
    them (padding, two codes per byte) does not take it; the layer stays in
    high precision, or takes ``--fallback`` when that format keeps them.
    ComfyUI, for example, reads channel counts and widths off such layers to
    pick the model's config, and a changed shape builds the wrong model.

    :param keys: every tensor name in the input checkpoint.
    :param metadata: the input's ``__metadata__`` (may be empty).
    :return: tensor name (one of ``keys``) -> a
        :class:`cq_core.plugin.types.ShapeRead` (the reason for the plan and the
        dimensions read) or just the reason (all dimensions), or None.
    """
