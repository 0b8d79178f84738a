"""Regenerate ``comfyui_shape_reads.json``: the tensors whose shape ComfyUI reads to detect a model.

Usage::

    python -m cq_models.generate_shape_reads PATH_TO_COMFYUI [--check]

``PATH_TO_COMFYUI`` is a ComfyUI tree (the folder holding ``comfy/``). Two
methods, unioned, because each covers what the other misses:

- **static**: every ``state_dict[...]`` / ``state_dict.get(...)`` read in
  ``comfy/model_detection.py`` (and ``sd[...]`` in ``comfy/sd.py``'s
  ``detect_te_model``, which sizes text encoders), with the key expression resolved through
  string constants, ``.format``, f-strings, ``+``, local variables (``in_key
  = ...; state_dict[in_key]``) and the arguments at the call sites of helper
  functions. ``key_prefix`` becomes the empty string (the table is relative to
  the model's own names); every other formatted value is a block index and
  becomes ``{N}``. Each read also gets the dimensions its value is used for
  (``.shape[1]``, ``w = ...; w.shape[0]``, ``len(x.shape)``: none) and the
  key-presence tests of the ``if`` branches around it (and of an early
  ``if KEY not in keys: return``), so cq applies it only to the family that
  reads it. This covers every family in the file, tiny instance or not.
- **probed**: ComfyUI's ``detect_unet_config`` run on the key sets of real
  model classes (instantiated on the meta device, so only shapes exist)
  through a mapping that records every key it reads. This catches reads the
  static pass cannot spell, and checks it.

The table also records the prefixes ComfyUI strips before detection
(``unet_prefix_from_state_dict``'s candidates and its fallback), so cq applies
each pattern under exactly those prefixes. Tests regenerate the table from the
vendored ComfyUI and fail when the shipped one is stale.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import itertools
import json
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cq_models.shape_reads import INDEX, TABLE_PATH, pattern_regex

DETECTION_MODULE = Path("comfy") / "model_detection.py"
#: Further detection code: (module, the state dict's name there, the functions to read).
#: ``detect_te_model`` picks a text encoder's size from its shapes (``load_clip``).
OTHER_SOURCES = ((Path("comfy") / "sd.py", "sd", frozenset({"detect_te_model"})),)
#: The parameter every detection function receives the checkpoint's prefix in.
PREFIX_PARAMETER = "key_prefix"
#: The mapping detection reads tensors from.
STATE_DICT = "state_dict"


# ---------------------------------------------------------------------------
# Static extraction
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UnresolvedRead:
    function: str
    line: int
    source: str


class _Resolver:
    """Resolves key expressions of one function to sets of name patterns."""

    def __init__(self, function: ast.FunctionDef, params: Mapping[str, set[str]]) -> None:
        self.function = function
        self.params = params  # parameter -> patterns known from call sites
        self.assigned: dict[str, list[ast.expr]] = {}
        self.loop_vars: set[str] = set()
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(node.value)
            elif isinstance(node, (ast.For, ast.comprehension)):
                for name in ast.walk(node.target):
                    if isinstance(name, ast.Name):
                        self.loop_vars.add(name.id)

    def resolve(self, expr: ast.expr, depth: int = 0) -> set[str] | None:
        """The patterns ``expr`` can evaluate to, or None when it is not a string built from names."""
        if depth > 20:
            return None
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.Name):
            if expr.id == PREFIX_PARAMETER:
                return {""}
            if expr.id in self.params:
                return set(self.params[expr.id])
            if expr.id in self.assigned:
                found: set[str] = set()
                for value in self.assigned[expr.id]:
                    patterns = self.resolve(value, depth + 1)
                    if patterns is None:
                        return None
                    found |= patterns
                return found
            return None
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left, right = self.resolve(expr.left, depth + 1), self.resolve(expr.right, depth + 1)
            if left is None or right is None:
                return None
            return {a + b for a, b in itertools.product(left, right)}
        if isinstance(expr, ast.JoinedStr):
            parts: list[set[str]] = []
            for value in expr.values:
                if isinstance(value, ast.Constant):
                    parts.append({value.value})
                else:
                    parts.append(self._formatted(value.value, depth))
            return {"".join(p) for p in itertools.product(*parts)}
        if (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Attribute)
            and expr.func.attr == "format"
            and not expr.keywords
        ):
            templates = self.resolve(expr.func.value, depth + 1)
            if templates is None:
                return None
            args = [self._formatted(arg, depth) for arg in expr.args]
            found = set()
            for template in templates:
                pieces = template.replace("{{", "\0").replace("}}", "\1").split("{}")
                if len(pieces) - 1 != len(args):
                    return None  # numbered or named fields: not a spelling detection uses
                for values in itertools.product(*args):
                    text = pieces[0] + "".join(v + p for v, p in zip(values, pieces[1:], strict=True))
                    found.add(text.replace("\0", "{").replace("\1", "}"))
            return found
        return None

    def _formatted(self, expr: ast.expr, depth: int) -> set[str]:
        """A value formatted into a key: a string it resolves to, else a block index."""
        patterns = self.resolve(expr, depth + 1)
        return patterns if patterns is not None else {INDEX}


def _key_of_read(node: ast.AST, state_dict: str = STATE_DICT) -> ast.expr | None:
    """The key expression of ``state_dict[key]`` or ``state_dict.get(key, ...)``, else None."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == state_dict:
        return node.slice if isinstance(node.ctx, ast.Load) else None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == state_dict
        and node.args
    ):
        return node.args[0]
    return None


# A condition is a set of alternatives, each a set of names that must all be present
# (disjunctive normal form over "this key is in the checkpoint"). Whatever the analysis
# cannot read as key presence counts as true: a read is then assumed to happen more often.
Condition = frozenset[frozenset[str]]
ALWAYS: Condition = frozenset({frozenset()})
#: More alternatives than this: give up and call the condition always true.
MAX_ALTERNATIVES = 64


def _simplify(alternatives: Iterable[frozenset[str]]) -> Condition:
    alternatives = set(alternatives)
    if len(alternatives) > MAX_ALTERNATIVES:
        return ALWAYS
    return frozenset(a for a in alternatives if not any(b < a for b in alternatives))


def both(a: Condition, b: Condition) -> Condition:
    return _simplify(x | y for x in a for y in b)


def either(a: Condition, b: Condition) -> Condition:
    return _simplify(a | b)


class _Conditions:
    """Reads the key-presence tests of ``if`` statements as conditions."""

    def __init__(self, resolver: _Resolver) -> None:
        self.resolver = resolver

    def of(self, test: ast.expr) -> Condition:
        if isinstance(test, ast.BoolOp):
            parts = [self.of(v) for v in test.values]
            combine = both if isinstance(test.op, ast.And) else either
            result = parts[0]
            for part in parts[1:]:
                result = combine(result, part)
            return result
        if (
            isinstance(test, ast.Compare)
            and len(test.ops) == 1
            and isinstance(test.ops[0], ast.In)
            and isinstance(test.comparators[0], ast.Name)
            and test.comparators[0].id in KEY_CONTAINERS
        ):
            return self._present(self.resolver.resolve(test.left))
        if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "any_suffix_in":
            # any_suffix_in(keys, prefix, main, [suffixes]): prefix + main + one of the suffixes
            if len(test.args) == 4 and isinstance(test.args[3], ast.List):
                mains = self.resolver.resolve(test.args[2])
                suffixes = [e.value for e in test.args[3].elts if isinstance(e, ast.Constant)]
                if mains is not None and len(suffixes) == len(test.args[3].elts):
                    return self._present({m + x for m in mains for x in suffixes})
        return ALWAYS

    def absent_guard(self, stmt: ast.stmt) -> Condition | None:
        """For ``if KEY not in keys: return ...``: the condition the statements after it run under."""
        if not (isinstance(stmt, ast.If) and not stmt.orelse and isinstance(stmt.body[-1], ast.Return)):
            return None
        test = stmt.test
        if (
            isinstance(test, ast.Compare)
            and len(test.ops) == 1
            and isinstance(test.ops[0], ast.NotIn)
            and isinstance(test.comparators[0], ast.Name)
            and test.comparators[0].id in KEY_CONTAINERS
        ):
            return self._present(self.resolver.resolve(test.left))
        return None

    @staticmethod
    def _present(patterns: set[str] | None) -> Condition:
        if not patterns:
            return ALWAYS
        return _simplify(frozenset({p}) for p in patterns)


#: Names detection tests key presence against (``'...' in state_dict_keys``).
KEY_CONTAINERS = frozenset({"state_dict_keys", "state_dict", "block_keys", "block_keys_output", "sd"})
COMPOUND = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


#: Axes of a read: the dimensions of the tensor's shape detection uses; None: all of them (or
#: the value itself). An empty set: only the number of dimensions.
Axes = frozenset[int] | None


def _union(a: Axes, b: Axes) -> Axes:
    return None if a is None or b is None else a | b


class _AxesOfUse:
    """Which shape dimensions a read's value is used for, following it through local variables."""

    def __init__(self, function: ast.FunctionDef) -> None:
        self.parent: dict[ast.AST, ast.AST] = {}
        self.loads: dict[str, list[ast.Name]] = {}
        for node in ast.walk(function):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                self.loads.setdefault(node.id, []).append(node)

    def of(self, node: ast.AST, depth: int = 0) -> Axes:
        parent = self.parent.get(node)
        if depth > 4 or parent is None:
            return None
        if isinstance(parent, ast.Attribute) and parent.attr == "shape":
            return self._of_shape(parent, depth)
        if isinstance(parent, ast.Attribute) and parent.attr in ("ndim", "dim"):
            return frozenset()  # the number of dimensions, which no format changes
        if isinstance(parent, ast.Attribute) and parent.attr == "size":
            call = self.parent.get(parent)
            if isinstance(call, ast.Call) and call.func is parent:
                dims = [*call.args, *(k.value for k in call.keywords if k.arg == "dim")]
                if len(dims) == 1 and isinstance(dims[0], ast.Constant | ast.UnaryOp):
                    return self._index(dims[0])
            return None
        if isinstance(parent, ast.Assign) and parent.value is node:
            return self._of_variable(parent, depth)
        if isinstance(parent, ast.Compare) and any(
            isinstance(c, ast.Constant) and c.value is None for c in [parent.left, *parent.comparators]
        ):
            return frozenset()  # `x is not None`
        return None

    def _of_shape(self, shape: ast.Attribute, depth: int) -> Axes:
        user = self.parent.get(shape)
        if isinstance(user, ast.Subscript) and user.value is shape:
            return self._index(user.slice)
        if isinstance(user, ast.Call) and isinstance(user.func, ast.Name) and user.func.id == "len":
            return frozenset()
        if isinstance(user, ast.Assign) and user.value is shape:
            return self._of_variable(user, depth)
        return None

    def _of_variable(self, assign: ast.Assign, depth: int) -> Axes:
        if len(assign.targets) != 1 or not isinstance(assign.targets[0], ast.Name):
            return None
        axes: Axes = frozenset()
        for use in self.loads.get(assign.targets[0].id, []):
            # A name reused for several reads unions their uses: more axes, never fewer.
            if isinstance(self.parent.get(use), ast.Subscript) and self.parent[use].value is use:
                axes = _union(axes, self._index(self.parent[use].slice))
            else:
                axes = _union(axes, self.of(use, depth + 1))
        return axes

    @staticmethod
    def _index(index: ast.expr) -> Axes:
        try:
            value = ast.literal_eval(index)
        except ValueError:
            return None
        return frozenset({value}) if isinstance(value, int) else None


@dataclass
class _FunctionReads:
    reads: list[tuple[str, Condition, Axes]]
    calls: list[tuple[str, Condition]]
    unresolved: list[UnresolvedRead]


def _function_reads(
    function: ast.FunctionDef, resolver: _Resolver, module_functions: set[str], state_dict: str
) -> _FunctionReads:
    """Every read in ``function`` with the condition it happens under, and the module calls likewise."""
    conditions = _Conditions(resolver)
    axes_of = _AxesOfUse(function)
    found = _FunctionReads([], [], [])

    def expressions(node: ast.AST, when: Condition) -> None:
        for sub in ast.walk(node):
            key = _key_of_read(sub, state_dict)
            if key is not None:
                patterns = resolver.resolve(key)
                if patterns is None:
                    found.unresolved.append(UnresolvedRead(function.name, sub.lineno, ast.unparse(key)))
                else:
                    axes = axes_of.of(sub)
                    found.reads += [(p, when, axes) for p in patterns]
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in module_functions:
                found.calls.append((sub.func.id, when))

    def test_expressions(test: ast.expr, when: Condition) -> None:
        # `a and b`: b is evaluated only where a holds (`key in keys and state_dict[key].shape...`).
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            for value in test.values:
                test_expressions(value, when)
                when = both(when, conditions.of(value))
        else:
            expressions(test, when)

    def block(statements: list[ast.stmt], when: Condition) -> None:
        for stmt in statements:
            statement(stmt, when)
            guard = conditions.absent_guard(stmt)
            if guard is not None:
                when = both(when, guard)

    def statement(stmt: ast.stmt, when: Condition) -> None:
        if isinstance(stmt, ast.If):
            test_expressions(stmt.test, when)
            block(stmt.body, both(when, conditions.of(stmt.test)))
            block(stmt.orelse, when)
        elif isinstance(stmt, (ast.For, ast.While)):
            expressions(stmt.iter if isinstance(stmt, ast.For) else stmt.test, when)
            block(stmt.body, when)
            block(stmt.orelse, when)
        elif isinstance(stmt, ast.With):
            for item in stmt.items:
                expressions(item.context_expr, when)
            block(stmt.body, when)
        elif isinstance(stmt, ast.Try):
            for part in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                block(part, when)
        elif not isinstance(stmt, COMPOUND):
            expressions(stmt, when)

    block(function.body, ALWAYS)
    return found


def _call_site_params(tree: ast.Module, functions: Mapping[str, ast.FunctionDef]) -> dict[str, dict[str, set[str]]]:
    """For each module function, its string parameters as resolved at the module's own call sites."""
    params: dict[str, dict[str, set[str]]] = {name: {} for name in functions}
    for caller in functions.values():
        resolver = _Resolver(caller, params.get(caller.name, {}))
        for node in ast.walk(caller):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions):
                continue
            callee = functions[node.func.id]
            names = [a.arg for a in callee.args.args]
            for name, arg in zip(names, node.args, strict=False):
                patterns = resolver.resolve(arg)
                if patterns is not None and name != PREFIX_PARAMETER:
                    params[callee.name].setdefault(name, set()).update(patterns)
    return params


@dataclass
class StaticRead:
    """A name detection reads, the functions that read it, and when (see :data:`Condition`)."""

    functions: set[str]
    when: Condition
    axes: Axes = frozenset()


def static_reads(
    source: str, state_dict: str = STATE_DICT, only: frozenset[str] | None = None
) -> tuple[dict[str, StaticRead], list[UnresolvedRead]]:
    """Every tensor read in ComfyUI's ``model_detection.py`` source (or the functions ``only`` of
    another module, whose state dict is called ``state_dict``): pattern -> who reads it and
    under which key-presence conditions; and the reads whose key no string analysis can name
    (listed, so a change shows)."""
    tree = ast.parse(source)
    functions = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and (only is None or node.name in only)
    }
    params = _call_site_params(tree, functions)
    # Twice: a helper's parameters may come from another helper's call sites.
    params = _call_site_params(tree, functions) if any(params.values()) else params
    per_function = {
        name: _function_reads(function, _Resolver(function, params[name]), set(functions), state_dict)
        for name, function in functions.items()
    }
    # When each function runs: always for one no module function calls (ComfyUI calls it),
    # else whenever one of its call sites runs. Settles within the call depth.
    entry: dict[str, Condition] = {name: ALWAYS for name in functions}
    for _ in range(len(functions)):
        sites: dict[str, Condition] = {}
        for caller, found in per_function.items():
            for callee, when in found.calls:
                sites[callee] = either(sites.get(callee, frozenset()), both(entry[caller], when))
        updated = {name: sites.get(name, ALWAYS) for name in functions}
        if updated == entry:
            break
        entry = updated
    reads: dict[str, StaticRead] = {}
    unresolved: list[UnresolvedRead] = []
    for name, found in per_function.items():
        unresolved += found.unresolved
        for pattern, when, axes in found.reads:
            read = reads.setdefault(pattern, StaticRead(set(), frozenset()))
            read.functions.add(name)
            read.when = either(read.when, both(entry[name], when))
            read.axes = _union(read.axes, axes)
    return reads, unresolved


def prefix_candidates(source: str) -> list[str]:
    """The prefixes ``unet_prefix_from_state_dict`` recognises, then its fallback, in its order."""
    tree = ast.parse(source)
    function = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "unet_prefix_from_state_dict"
    )
    prefixes: list[str] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "candidates" for t in node.targets):
            prefixes += [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and node.value.value:
            prefixes.append(node.value.value)
    return list(dict.fromkeys(prefixes))


# ---------------------------------------------------------------------------
# Dynamic probing
# ---------------------------------------------------------------------------


class RecordingStateDict(dict):
    """A state dict that remembers every key read through ``[]`` or ``get``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


@dataclass(frozen=True)
class Probe:
    """A model family built with ComfyUI's own class on the meta device: its names and shapes."""

    family: str
    #: ``build(comfy)`` -> the model (an ``nn.Module`` whose state dict has ComfyUI's own names)
    build: Callable[[Any], Any]

    def shapes(self, comfy: Any) -> dict[str, tuple[int, ...]]:
        import torch

        with torch.device("meta"):
            model = self.build(comfy)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _ops(comfy: Any) -> Any:
    return comfy.ops.disable_weight_init


def _flux(comfy: Any) -> Any:
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
                hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                txt_ids_dims=[], operations=_ops(comfy))


def _ltxv(comfy: Any) -> Any:
    from comfy.ldm.lightricks.model import LTXVModel

    return LTXVModel(in_channels=128, cross_attention_dim=256, attention_head_dim=8, num_attention_heads=32,
                     caption_channels=64, num_layers=2, operations=_ops(comfy))


def _wan(comfy: Any) -> Any:
    from comfy.ldm.wan.model import WanModel

    return WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=256, ffn_dim=512,
                    freq_dim=256, text_dim=64, out_dim=16, num_heads=2, num_layers=2, operations=_ops(comfy))


def _qwen_image(comfy: Any) -> Any:
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=96,
                                       pooled_projection_dim=96, axes_dims_rope=(8, 12, 12), operations=_ops(comfy))


def _hunyuan_video(comfy: Any) -> Any:
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    return HunyuanVideo(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                        context_in_dim=96, hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                        qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
                        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False, operations=_ops(comfy))


def _sd3(comfy: Any) -> Any:
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=96,
                 context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 80,
                                                                                  "out_features": 128}},
                 num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None, qk_norm="rms",
                 x_block_self_attn_layers=[0], operations=_ops(comfy))


def _sdxl_unet(comfy: Any) -> Any:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1],
                     channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                     transformer_depth_middle=1, context_dim=80, num_head_channels=16, use_linear_in_transformer=True,
                     adm_in_channels=96, num_classes="sequential", use_spatial_transformer=True,
                     use_temporal_resblock=False, use_temporal_attention=False, operations=_ops(comfy))


#: Families whose detection is recorded, built from ComfyUI's own classes.
PROBES: tuple[Probe, ...] = (
    Probe("flux", _flux),
    Probe("ltxv", _ltxv),
    Probe("wan", _wan),
    Probe("qwen_image", _qwen_image),
    Probe("hunyuan_video", _hunyuan_video),
    Probe("sd3", _sd3),
    Probe("sdxl_unet", _sdxl_unet),
)


def meta_state_dict(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> RecordingStateDict:
    import torch

    return RecordingStateDict({prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()})


def probed_reads(comfy: Any, probes: Iterable[Probe] = PROBES) -> dict[str, set[str]]:
    """Run ComfyUI's detection on each probe's names; pattern -> the families whose detection read it."""
    reads: dict[str, set[str]] = {}
    for probe in probes:
        state_dict = meta_state_dict(probe.shapes(comfy))
        if comfy.model_detection.detect_unet_config(state_dict, "") is None:
            raise RuntimeError(f"ComfyUI does not detect the {probe.family} probe; fix its constructor arguments")
        for key in state_dict.read:
            reads.setdefault(key, set()).add(probe.family)
    return reads


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def import_comfyui(root: Path) -> Any:
    """Import the ComfyUI at ``root`` on the CPU (torchvision/torchaudio stubbed when missing)."""
    for name in ("torchvision", "torchaudio"):
        try:
            __import__(name)
        except Exception:
            sys.modules.pop(name, None)
            sys.meta_path.insert(0, _StubFinder(name))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # ComfyUI parses the command line on import
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_detection
        import comfy.ops  # noqa: F401
    finally:
        sys.argv = saved_argv
    return comfy


def _placeholder(name: str) -> type:
    """A stub module's attribute: a class that accepts anything. Dunder names stay missing, so
    code that probes modules (``__file__``, ``__version__``: hypothesis, inspect) sees a bare module."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__init__": lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import-only stand-ins for a package ComfyUI imports but detection never uses."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == self.package:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        pass


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text(encoding="utf-8") if (root / "comfyui_version.py").exists() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def all_static_reads(root: Path) -> tuple[dict[str, StaticRead], list[UnresolvedRead]]:
    """:func:`static_reads` of ``model_detection.py`` and of :data:`OTHER_SOURCES`, merged."""
    static, unresolved = static_reads((root / DETECTION_MODULE).read_text(encoding="utf-8"))
    for module, state_dict, only in OTHER_SOURCES:
        more, more_unresolved = static_reads((root / module).read_text(encoding="utf-8"), state_dict, only)
        unresolved += more_unresolved
        for pattern, read in more.items():
            if pattern in static:
                known = static[pattern]
                known.functions |= read.functions
                known.when = either(known.when, read.when)
                known.axes = _union(known.axes, read.axes)
            else:
                static[pattern] = read
    return static, unresolved


def build_table(root: Path, comfy: Any | None = None) -> dict[str, Any]:
    """The table for the ComfyUI tree at ``root``; ``comfy`` (already imported) enables probing."""
    source = (root / DETECTION_MODULE).read_text(encoding="utf-8")
    static, unresolved = all_static_reads(root)
    by = {pattern: set(read.functions) for pattern, read in static.items()}
    when = {pattern: read.when for pattern, read in static.items()}
    axes = {pattern: read.axes for pattern, read in static.items()}
    # A probed name that a static pattern already covers counts for that pattern, so the
    # table stays one entry per spelling; one it does not is added as read, unconditionally.
    matchers = {pattern: re.compile(pattern_regex(pattern)) for pattern in static}
    for name, families in (probed_reads(comfy) if comfy is not None else {}).items():
        covering = [p for p, regex in matchers.items() if regex.fullmatch(name)] or [name]
        for pattern in covering:
            by.setdefault(pattern, set()).update(f"probe:{f}" for f in families)
            when.setdefault(pattern, ALWAYS)
            axes.setdefault(pattern, None)
    return {
        "comfyui_version": comfyui_version(root),
        "generated_by": "python -m cq_models.generate_shape_reads PATH_TO_COMFYUI",
        "about": (
            "Tensor names (relative to the diffusion model's prefix, or to a text encoder file) whose "
            "shape ComfyUI's model detection (model_detection.py, sd.detect_te_model) reads; "
            f"{INDEX} stands for any block index. A layer named here must keep the dimensions read, "
            "or ComfyUI builds the wrong model."
        ),
        "prefixes": prefix_candidates(source),
        "about_reads": (
            "name -> {axes: the shape dimensions detection uses (negative: from the end; null: all, or "
            "the value), when: alternatives, each a list of names that must all be present under the "
            "same prefix for detection to read it ([[]]: always), by: the reading functions and the "
            "probed families whose detection read it}"
        ),
        "reads": {
            pattern: {
                "axes": None if axes[pattern] is None else sorted(axes[pattern]),
                "when": sorted(sorted(alt) for alt in when[pattern]),
                "by": sorted(by[pattern]),
            }
            for pattern in sorted(by)
        },
        "unresolved": [f"{u.function}:{u.source}" for u in unresolved],
    }


def render(table: Mapping[str, Any]) -> str:
    """The table as JSON with one line per entry, so a ComfyUI update reads as a short diff."""
    lines = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(items) + "\n }")
        elif isinstance(value, list):
            items = [f"  {json.dumps(v)}" for v in value]
            body = "[\n" + ",\n".join(items) + "\n ]" if items else "[]"
            lines.append(f" {json.dumps(key)}: {body}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cq_models.generate_shape_reads", description=__doc__.split("\n")[0]
    )
    parser.add_argument("comfyui", type=Path, help="a ComfyUI tree (the folder holding comfy/)")
    parser.add_argument("--no-probe", action="store_true", help="static extraction only (no ComfyUI import)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the shipped table differs")
    parser.add_argument("--output", type=Path, default=TABLE_PATH)
    args = parser.parse_args(argv)
    comfy = None if args.no_probe else import_comfyui(args.comfyui.resolve())
    text = render(build_table(args.comfyui, comfy))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale; rerun without --check", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(json.loads(text)['reads'])} patterns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
