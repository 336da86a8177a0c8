"""Slim export: physically remove channels that are dead, so the shipped model is smaller and faster.

A channel is dead when it is exactly zero for every input. FMP with ``--hard-prune`` leaves such channels: the
conv's output-channel weights are zero and the BatchNorm after it has γ = β = 0. torch-pruning's DependencyGraph
(DepGraph, Fang et al., CVPR 2023) groups the channels that must go together (a residual stream couples the
convs, BNs and shortcuts that write it); a group index is removed only when **every** layer that writes that
channel writes zero there:

* Conv / Linear output channel: weight slice all zero and bias zero (or no bias);
* BatchNorm channel: γ = 0 and β = 0 (its output is then zero whatever it receives);
* any other layer that writes channels (LayerNorm, GroupNorm, PReLU, attention, …): the group is left alone.

Layers that only read the channel (next conv's input slice, linear's input features) lose the matching slice,
which multiplied zeros. The classifier head's outputs are never touched. The result is checked against the
unpruned model on the example input plus seeded random inputs before it is returned.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import RunFailed
from ..io.data import Holdout
from ..io.models import LoadedModel

log = logging.getLogger(__name__)

SLIM_RTOL = 1e-4  # max |Δlogit| / max(1, |logit|) allowed between the slim and unpruned torch models


def _count(module: nn.Module, example: torch.Tensor) -> dict:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    macs = int(macs)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return {"params": int(params), "macs": int(macs), "flops": int(2 * macs), "weight_bytes": int(weight_bytes)}


def _head(module: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The last Conv/Linear that runs: its outputs are the logits and are never pruned."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in module.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


def _zero_channels(layer: nn.Module, idxs: list[int], transposed: bool = False) -> torch.Tensor | None:
    """Per index: is this output channel exactly zero for every input? None = this layer type is not understood."""
    index = torch.as_tensor(idxs, dtype=torch.long)
    if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        weight = layer.weight.detach()
        weight = weight.transpose(0, 1) if getattr(layer, "transposed", False) else weight
        dead = weight[index].flatten(1).eq(0).all(dim=1)
        if layer.bias is not None:
            dead &= layer.bias.detach()[index].eq(0)
        return dead
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if not layer.affine:
            return torch.zeros(len(idxs), dtype=torch.bool)
        return layer.weight.detach()[index].eq(0) & layer.bias.detach()[index].eq(0)
    return None


def _dead_root_indices(graph, group) -> list[int]:
    """Root indices of ``group`` that every channel-writing layer in the group writes as zero."""
    import torch_pruning as tp
    from torch_pruning import _helpers

    root_count = len(group[0].idxs)
    dead = torch.ones(root_count, dtype=torch.bool)
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        if not isinstance(layer, nn.Module) or not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        if dep.target.type not in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR,
                                   tp.ops.OPTYPE.BN):
            if dep.target.type in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
                                   tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND,
                                   tp.ops.OPTYPE.SLICE):
                continue  # functional ops keep zeros zero; the parity check below guards the exceptions
            return []
        zero = _zero_channels(layer, _helpers.to_plain_idxs(idxs))
        if zero is None:
            return []
        roots = torch.as_tensor(_helpers.to_root_idxs(idxs), dtype=torch.long)
        if (roots < 0).any() or any(r is None for r in _helpers.to_root_idxs(idxs)):
            return []
        alive_roots = roots[~zero]
        dead[alive_roots] = False
    return torch.nonzero(dead).flatten().tolist()


def _relative_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    scale = reference.abs().amax(dim=1).clamp(min=1.0)
    return float(((reference - candidate).abs().amax(dim=1) / scale).max())


def slim_model(module: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, dict]:
    """A copy of ``module`` with its dead channels physically removed, and what changed.

    ``info``: params / MACs / FLOPs / weight bytes before and after, channels removed per root layer, and the
    relative logit difference to the unpruned model (checked ≤ SLIM_RTOL, else RunFailed).
    """
    import torch_pruning as tp

    original = module
    module = copy.deepcopy(module).float().cpu().eval()
    example = example_input.detach().float().cpu()
    before = _count(module, example)
    head = _head(module, example)
    names = {m: name for name, m in module.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example, verbose=False)
        removed: dict[str, int] = {}
        for group in graph.get_all_groups(ignored_layers=[head] if head is not None else [],
                                          root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            dead = _dead_root_indices(graph, group)
            channels = len(group[0].idxs)
            if not dead:
                continue
            if len(dead) >= channels:
                dead = dead[1:]  # keep one channel: a zero-width layer is not a valid graph
            if not dead:
                continue
            root, handler = group[0].dep.target.module, group[0].dep.handler
            sub = graph.get_pruning_group(root, handler, idxs=dead)
            sub.prune()
            removed[names.get(root, type(root).__name__)] = len(dead)
    after = _count(module, example)
    generator = torch.Generator().manual_seed(0)
    probe = torch.cat([example, torch.randn(16, *example.shape[1:], generator=generator)])
    with torch.no_grad():
        reference = copy.deepcopy(original).float().cpu().eval()(probe)
        slimmed = module(probe)
    diff = _relative_diff(reference.double(), slimmed.double())
    info = {"before": before, "after": after, "channels_removed": removed,
            "channels_removed_total": int(sum(removed.values())), "max_scaled_diff": diff}
    if not diff <= SLIM_RTOL:
        raise RunFailed(f"removing dead channels changed the model's outputs (scaled |Δlogit| {diff:.3g}); "
                        "a layer type treats zero channels specially", hint="export without --slim")
    return module, info


def export_slim_onnx(model: LoadedModel, out: str | Path, *, holdout: Holdout | None = None,
                     extra_metadata: dict[str, str] | None = None, **kwargs) -> dict:
    """Slim ``model`` and export it to ONNX, with parity measured against the **unpruned** model."""
    from ..io.preprocess import Normalized
    from .onnx import build_onnx_model, export_input_size, export_onnx

    input_hw = export_input_size(model, holdout, kwargs.get("input_size"))
    example = torch.rand(2, len(model.preprocessing.mean), *input_hw, generator=torch.Generator().manual_seed(0))
    example = (example - torch.tensor(model.preprocessing.mean).view(1, -1, 1, 1)) / torch.tensor(
        model.preprocessing.std).view(1, -1, 1, 1)
    slim_module, info = slim_model(model.module, example)
    unpruned_proto = build_onnx_model(model, input_hw, bake_preprocessing=kwargs.get("bake_preprocessing", False),
                                      opset=kwargs.get("opset", 18))
    info["before"]["onnx_bytes"] = unpruned_proto.ByteSize()
    slim = copy.copy(model)
    slim.module = slim_module
    reference = Normalized(copy.deepcopy(model.module).float().cpu().eval(), model.preprocessing)
    artifact = export_onnx(slim, out, holdout=holdout, reference=reference, **kwargs,
                           extra_metadata={**(extra_metadata or {}),
                                           "bdsan.slim": json.dumps({"channels_removed": info["channels_removed"]})})
    info["after"]["onnx_bytes"] = artifact["bytes"]
    artifact["slim"] = info
    log.info("slim: %d channels removed; params %d → %d, FLOPs %d → %d, ONNX %d → %d bytes",
             info["channels_removed_total"], info["before"]["params"], info["after"]["params"],
             info["before"]["flops"], info["after"]["flops"], info["before"]["onnx_bytes"], artifact["bytes"])
    return artifact
