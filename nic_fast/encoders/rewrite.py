"""Exact rewrites of an encoder's graph for inference, applied when it is loaded.

Two rewrites, both exact up to fp32 rounding, on any encoder whose graph torch can
capture (a built-in module, a TorchScript ``.pt`` through torch's TorchScript converter,
a ``.pt2`` program as it is):

* **A leading average pool is absorbed into patchify.** The paper's 64-px encoders start
  with a 2×2 average pool on their 128-px input. Patchify already box-averages by an
  integer factor while it cuts patches, so the pool is removed from the graph and the
  engine asks patchify for ``pool_px`` more downsampling: the encoder sees 4 × fewer
  pixels and nothing computes them twice.
* **Inference BatchNorm is folded into a neighbouring affine layer.** A BatchNorm right
  after a convolution folds into that convolution (always exact). A BatchNorm that feeds
  a convolution with no padding, or a flatten and a dense layer, folds into *that* layer:
  ``conv(a·x + b) = conv_{W·a}(x) + Σ W·b``, which holds only where no zero padding is
  mixed in (padding would see ``b`` where the original saw 0). The paper's encoders are
  Conv → LeakyReLU → BatchNorm chains with 'valid' padding, so every BatchNorm goes.

Every rewrite is checked on random inputs against the module as loaded before it is
used; a graph that cannot be captured, or a rewrite that does not reproduce the
original, leaves the module as it is, and :class:`Rewrites` says why.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import operator
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

import torch
from torch import fx, nn

from nic_fast.encoders.spec import Encoder

__all__ = ["MAX_RELATIVE_ERROR", "Rewrites", "Rewritten", "error_line", "rewrite_encoder", "rewrite_error",
           "script_to_graph"]

log = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 1e-5  # rewritten vs original on the check batch (relative L2); fp32 rounding is ~1e-7
_CHECK_BATCH = 4
_aten = torch.ops.aten
_BATCH_NORMS = (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default)
_TS_MARKERS = ("aten::batch_norm", "aten::avg_pool2d")  # TorchScript ops worth converting the graph for


@dataclass(frozen=True)
class Rewrites:
    """What was done to an encoder's graph; stored in every store's attributes."""

    graph: str  # how the graph was captured ("torch.export", "TorchScript converter") or "not captured"
    pool_px: int = 1  # leading pool factor absorbed into patchify (1: none)
    batchnorms_folded: int = 0
    batchnorms_left: int = 0  # inference BatchNorms no rule could fold (padding, branching)
    note: str = ""  # why nothing (or less) was rewritten
    relative_error: float | None = None  # rewritten vs original on the check batch
    kept: bool = False  # loaded from the rewrite cache (checked again against the original)

    def as_attrs(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in ("", None)}


@dataclass
class Rewritten:
    """The module to run: it takes ``input_px``-side patches (``spec.input_px // pool_px``)."""

    module: Callable[[torch.Tensor], torch.Tensor]
    input_px: int
    rewrites: Rewrites

    @property
    def pool_px(self) -> int:
        return self.rewrites.pool_px


def rewrite_encoder(encoder: Encoder, *, absorb_pool: bool = True, fold_batchnorms: bool = True) -> Rewritten:
    """The encoder's module with every exact rewrite that applies (the encoder on the CPU, fp32);
    the keywords switch single rewrites off (the benchmark times each step)."""
    spec = encoder.spec
    example = torch.rand(_CHECK_BATCH, spec.channels, spec.input_px, spec.input_px) * 2 - 1
    try:
        graph, how = _capture(encoder.module, example)
    except Exception as exc:  # noqa: BLE001 - capture fails in many ways on foreign modules: run it as it is
        return _unchanged(encoder, "not captured", f"graph not captured ({error_line(exc)})")
    if graph is None:
        return _unchanged(encoder, "not captured", how)
    _drop_guards(graph)
    pool_px = _absorb_leading_pool(graph, spec.input_px) if absorb_pool else 1
    folded = _fold_batchnorms(graph) if fold_batchnorms else 0
    graph.graph.eliminate_dead_code()
    graph.recompile()
    graph.delete_all_unused_submodules()
    left = sum(1 for node in graph.graph.nodes if node.target in _BATCH_NORMS)
    if pool_px == 1 and folded == 0:
        return Rewritten(encoder.module, spec.input_px,
                         Rewrites(how, batchnorms_left=left, note="nothing to rewrite (no leading pool, no foldable "
                                                                  "BatchNorm)"))
    error = _relative_error(encoder.module, graph, example, pool_px)
    rewrites = Rewrites(how, pool_px, folded, left, relative_error=error)
    if not error <= MAX_RELATIVE_ERROR:  # NaN fails too
        log.warning("encoder %r: the rewritten graph differs from the original (relative error %.2g); "
                    "running it as loaded", spec.name, error)
        return _unchanged(encoder, how, f"rewrite rejected: relative error {error:.2g} > {MAX_RELATIVE_ERROR:g}")
    return Rewritten(graph, spec.input_px // pool_px, rewrites)


def _unchanged(encoder: Encoder, graph: str, note: str) -> Rewritten:
    return Rewritten(encoder.module, encoder.spec.input_px, Rewrites(graph, note=note))


# -- capture ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Graph capture narrates (converter warnings, export notes); none of it is for the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(previous)


def _capture(module: Any, example: torch.Tensor) -> tuple[fx.GraphModule | None, str]:
    """An ATen-level graph of ``module`` (a new one: rewriting never touches the loaded module),
    or None and why there is no point."""
    with _quiet(), torch.no_grad():
        if isinstance(module, fx.GraphModule):  # a .pt2 program's module()
            return copy.deepcopy(module), "torch.export"  # the loaded module stays as it was
        if isinstance(module, torch.jit.ScriptModule):
            graph_ops = {node.kind() for node in module.inlined_graph.nodes()}
            if not any(op in graph_ops for op in _TS_MARKERS):
                return None, "nothing to rewrite (no BatchNorm or average pool in the TorchScript graph)"
            from torch._export.converter import TS2EPConverter  # slow to import: only when needed

            program = TS2EPConverter(module, (example,)).convert()
            return program.module(), "TorchScript converter"
        if isinstance(module, nn.Module):
            if not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.AvgPool2d)) for m in module.modules()):
                return None, "nothing to rewrite (no BatchNorm or average pool in the module)"
            program = torch.export.export(module.eval(), (example,), strict=False)
            return program.module(), "torch.export"
    return None, f"cannot capture a {type(module).__name__}"


def script_to_graph(module: torch.jit.ScriptModule, example: torch.Tensor) -> fx.GraphModule:
    """A TorchScript module as an FX graph (torch's TorchScript converter), for what takes
    graphs and not TorchScript (``torch.compile``). Raises what the converter raises."""
    from torch._export.converter import TS2EPConverter  # slow to import: only when needed

    with _quiet(), torch.no_grad():
        graph = TS2EPConverter(module, (example,)).convert().module()
    _drop_guards(graph)
    graph.recompile()
    return graph


def _drop_guards(graph: fx.GraphModule) -> None:
    """torch.export's input-shape guards (a graph node and a pre-hook): they would refuse the
    pooled (smaller) input, and the rewritten graph is checked against the original instead."""
    graph._forward_pre_hooks.clear()
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.graph.erase_node(node)


# -- leading pool ------------------------------------------------------------------------------


def _absorb_leading_pool(graph: fx.GraphModule, input_px: int) -> int:
    """Remove a square, stride = kernel, unpadded average pool applied to the input itself."""
    inputs = [node for node in graph.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return 1
    users = [user for user in inputs[0].users if not _is_shape_query(user)]
    if len(users) != 1 or users[0].target != _aten.avg_pool2d.default:
        return 1
    pool = users[0]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = _pool_args(pool)
    if (len(set(kernel)) != 1 or list(stride) != list(kernel) or any(padding) or divisor is not None
            or input_px % kernel[0]):
        return 1
    del ceil_mode, count_include_pad  # irrelevant without padding on an exact multiple
    pool.replace_all_uses_with(inputs[0])
    graph.graph.erase_node(pool)
    return int(kernel[0])


def _pool_args(node: fx.Node) -> tuple[list[int], list[int], list[int], bool, bool, int | None]:
    args = list(node.args) + [None] * (7 - len(node.args))
    kernel = _pair(args[1])
    stride = _pair(args[2]) if args[2] else kernel
    padding = _pair(args[3] if args[3] is not None else 0)
    return kernel, stride, padding, bool(args[4]), args[5] is not False, args[6]


def _pair(value: Any) -> list[int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * 2 if len(values) == 1 else values


def _is_shape_query(node: fx.Node) -> bool:
    return node.target in (_aten.dim.default, _aten.size.default, _aten.sym_size.int)


# -- BatchNorm folding ---------------------------------------------------------------------------


@dataclass
class _Affine:
    """An inference BatchNorm as y = a·x + b per channel (float64)."""

    node: fx.Node
    output: fx.Node  # the node whose users read the normalised tensor
    source: fx.Node  # its input
    a: torch.Tensor
    b: torch.Tensor


def _fold_batchnorms(graph: fx.GraphModule) -> int:
    folded = 0
    for node in list(graph.graph.nodes):
        bn = _as_affine(graph, node)
        if bn is None:
            continue
        if _fold_into_conv_before(graph, bn) or _fold_into_conv_after(graph, bn) or _fold_into_dense_after(graph, bn):
            folded += 1
    return folded


def _as_affine(graph: fx.GraphModule, node: fx.Node) -> _Affine | None:
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return None
    if node.target == _aten.batch_norm.default:
        x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
        output = node
    else:  # _native_batch_norm_legit_no_training returns (out, mean, rstd): only out may be used
        x, weight, bias, mean, var, _momentum, eps = node.args[:7]
        training = False
        getters = list(node.users)
        if len(getters) != 1 or getters[0].target is not operator.getitem or getters[0].args[1] != 0:
            return None
        output = getters[0]
    if training or not all(_is_attr(n) for n in (mean, var)) or not all(n is None or _is_attr(n) for n in (weight, bias)):
        return None
    mean64, var64 = _value(graph, mean).double(), _value(graph, var).double()
    a = 1.0 / torch.sqrt(var64 + float(eps))
    if weight is not None:
        a = a * _value(graph, weight).double()
    b = -mean64 * a
    if bias is not None:
        b = b + _value(graph, bias).double()
    return _Affine(node, output, x, a, b)


def _fold_into_conv_before(graph: fx.GraphModule, bn: _Affine) -> bool:
    """conv → BN: scale the conv's output channels (any padding)."""
    conv = bn.source
    if not _is_conv(conv) or len(conv.users) != 1:
        return False
    weight = _value(graph, conv.args[1]).double()
    bias = _conv_bias(graph, conv, weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    _set_conv(graph, conv, weight * bn.a.reshape(shape), bias * bn.a + bn.b)
    _bypass(graph, bn, conv)
    return True


def _fold_into_conv_after(graph: fx.GraphModule, bn: _Affine) -> bool:
    """BN → conv without padding or groups: scale the conv's input channels, shift its bias."""
    users = list(bn.output.users)
    if len(users) != 1 or not _is_conv(users[0]) or users[0].args[0] is not bn.output:
        return False
    conv = users[0]
    if _conv_padded(conv) or _conv_groups(conv) != 1:
        return False
    weight = _value(graph, conv.args[1]).double()
    bias = _conv_bias(graph, conv, weight)
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    shift = (weight * bn.b.reshape(shape)).sum(dim=tuple(range(1, weight.dim())))
    _set_conv(graph, conv, weight * bn.a.reshape(shape), bias + shift)
    _bypass(graph, bn, bn.source)
    return True


def _fold_into_dense_after(graph: fx.GraphModule, bn: _Affine) -> bool:
    """BN → flatten(1) → linear: each channel's a, b repeated over its (channel-major) positions."""
    users = list(bn.output.users)
    if len(users) != 1 or users[0].target != _aten.flatten.using_ints or len(users[0].users) != 1:
        return False
    flatten = users[0]
    if (flatten.args[1] if len(flatten.args) > 1 else 0) != 1 or (flatten.args[2] if len(flatten.args) > 2 else -1) != -1:
        return False
    dense = next(iter(flatten.users))
    if dense.target != _aten.linear.default or dense.args[0] is not flatten or not _is_attr(dense.args[1]):
        return False
    weight = _value(graph, dense.args[1]).double()
    channels = len(bn.a)
    if weight.shape[1] % channels:
        return False
    per_channel = weight.shape[1] // channels
    a, b = bn.a.repeat_interleave(per_channel), bn.b.repeat_interleave(per_channel)
    bias_node = dense.args[2] if len(dense.args) > 2 else None
    bias = _value(graph, bias_node).double() if bias_node is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    new_weight, new_bias = weight * a[None, :], bias + weight @ b
    dense.args = (flatten, _new_attr(graph, dense, "weight", new_weight, dense.args[1]),
                  _new_attr(graph, dense, "bias", new_bias, dense.args[1]))
    _bypass(graph, bn, bn.source)
    return True


def _is_conv(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target == _aten.conv2d.default
            and _is_attr(node.args[1]) and (len(node.args) < 3 or node.args[2] is None or _is_attr(node.args[2])))


def _conv_padded(conv: fx.Node) -> bool:
    padding = conv.args[4] if len(conv.args) > 4 else conv.kwargs.get("padding", 0)
    if isinstance(padding, str):
        return padding != "valid"
    return any(_pair(padding))


def _conv_groups(conv: fx.Node) -> int:
    return int(conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1))


def _conv_bias(graph: fx.GraphModule, conv: fx.Node, weight: torch.Tensor) -> torch.Tensor:
    node = conv.args[2] if len(conv.args) > 2 else None
    return _value(graph, node).double() if node is not None else torch.zeros(weight.shape[0], dtype=torch.float64)


def _set_conv(graph: fx.GraphModule, conv: fx.Node, weight: torch.Tensor, bias: torch.Tensor) -> None:
    args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
    args[1] = _new_attr(graph, conv, "weight", weight, conv.args[1])
    args[2] = _new_attr(graph, conv, "bias", bias, conv.args[1])
    conv.args = tuple(args)


def _bypass(graph: fx.GraphModule, bn: _Affine, replacement: fx.Node) -> None:
    """Readers of the BatchNorm's output read ``replacement`` instead; the BatchNorm goes."""
    bn.output.replace_all_uses_with(replacement)
    if bn.output is not bn.node:
        graph.graph.erase_node(bn.output)
    graph.graph.erase_node(bn.node)


def _new_attr(graph: fx.GraphModule, user: fx.Node, kind: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """A fresh folded tensor (float64 maths, stored in the original's dtype) as a get_attr node."""
    dtype = _value(graph, like).dtype
    name = f"_folded_{user.name}_{kind}"
    graph.register_buffer(name, value.to(dtype).contiguous())
    with graph.graph.inserting_before(user):
        return graph.graph.get_attr(name)


# -- helpers -----------------------------------------------------------------------------------


def _is_attr(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    return reduce(getattr, parents, module), attr


def _value(graph: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, attr = _owner(graph, str(node.target))
    return getattr(owner, attr).detach()


def rewrite_error(encoder: Encoder, module: Callable[[torch.Tensor], torch.Tensor], pool_px: int) -> float:
    """Relative L2 error of ``module`` (taking ``pool_px``-pooled patches) against the encoder as
    loaded, on a fresh random batch: how a rewritten module from anywhere (a cache) is vetted."""
    spec = encoder.spec
    example = torch.rand(_CHECK_BATCH + 1, spec.channels, spec.input_px, spec.input_px) * 2 - 1
    return _relative_error(encoder.module, module, example, pool_px)


def _relative_error(original: Callable[[torch.Tensor], torch.Tensor], rewritten: Callable[[torch.Tensor], torch.Tensor],
                    example: torch.Tensor, pool_px: int) -> float:
    with torch.inference_mode():
        expected = original(example).double()
        pooled = torch.nn.functional.avg_pool2d(example, pool_px) if pool_px > 1 else example
        got = rewritten(pooled)
        got = (got[0] if isinstance(got, (tuple, list)) else got).double()
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a one-line note says about a torch failure."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
