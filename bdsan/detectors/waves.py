"""The scan's ``wave`` kind: grey plane waves (SIG's trigger family), searched rather than optimised.

Per class the scan picks the plane wave that sends the most optimisation images to it (:func:`wave_rates`,
:func:`best_waves`) and flags the class when that wave flips most held-out images and the response is neither
texture (:func:`edge_ratios`) nor a sink (the shuffled-wave control); :func:`wave_verdict` applies those rules.
:func:`plane_wave_trigger` turns a chosen wave into a Trigger for the defenses.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..device import precision_autocast
from .triggers import Trigger

if TYPE_CHECKING:
    from .scan import ScanSettings

WAVES_PER_FREQUENCY = 8  # plane_waves: two axes × four phases per frequency


def plane_waves(height: int, width: int, periods: int) -> torch.Tensor:
    """Unit-amplitude grey plane waves sin(2π·f·position + φ), P×1×H×W: for f = 1..``periods`` periods per image,
    running across the columns (constant down each column, as SIG's sine) then down the rows, four phases each;
    wave p has f = p // 8 + 1, axis ``("columns", "rows")[p // 4 % 2]``, φ = (p % 4)·π/2."""
    frequency = torch.arange(1, periods + 1, dtype=torch.float32).view(-1, 1, 1, 1)
    phase = (torch.arange(4, dtype=torch.float32) * math.pi / 2).view(1, -1, 1, 1)
    across = torch.sin(2 * math.pi * frequency * torch.arange(width).view(1, 1, 1, -1) / width + phase)
    down = torch.sin(2 * math.pi * frequency * torch.arange(height).view(1, 1, -1, 1) / height + phase)
    waves = torch.stack([across.expand(-1, -1, height, width), down.expand(-1, -1, height, width)], dim=1)
    return waves.reshape(-1, 1, height, width)


def plane_wave_trigger(index: int, target: int, amplitude: float):
    """Wave ``index`` of :func:`plane_waves` (any frequency ≥ 1: index // 8 + 1 periods) at ``amplitude`` as a
    Trigger that adds it to [0,1] images of any size (reconstructed, kind ``wave``, for ``target``)."""
    periods = index // WAVES_PER_FREQUENCY + 1

    def apply(x: torch.Tensor, **_params) -> torch.Tensor:
        wave = plane_waves(*x.shape[-2:], periods)[index].to(x)
        return (x + amplitude * wave).clamp(0, 1)

    params = {"source": "scan", "kind": "wave", "target": target, "anomalous": True, "wave_index": index,
              "amplitude": amplitude}
    return Trigger(f"scan_wave_class{target}_{periods}periods", params, apply)


def wave_name(index: int) -> str:
    """``index`` of :func:`plane_waves` in words."""
    return (f"{index // WAVES_PER_FREQUENCY + 1} periods across the {('columns', 'rows')[index // 4 % 2]}, "
            f"phase {index % 4}π/2")


@torch.no_grad()
def wave_rates(net, x: torch.Tensor, y: torch.Tensor, waves: torch.Tensor, num_classes: int, batch_size: int,
               device: torch.device, bf16: bool = False) -> torch.Tensor:
    """W×K: the fraction of the images ``x`` (float, labels ``y``) of classes other than k that wave w, added and
    clipped, sends to class k; one batched pass over every wave × image pair."""
    count = len(x)
    hits = torch.zeros(len(waves), num_classes, device=device)
    pairs = len(waves) * count
    for start in range(0, pairs, batch_size):
        pair = torch.arange(start, min(start + batch_size, pairs), device=device)
        wave, image = pair // count, pair % count
        with precision_autocast(device, bf16):
            predicted = net((x[image] + waves[wave]).clamp(0, 1)).argmax(1)
        moved = predicted != y[image]
        hits.index_put_((wave[moved], predicted[moved]), torch.ones_like(wave[moved], dtype=hits.dtype),
                        accumulate=True)
    return hits / (count - torch.bincount(y, minlength=num_classes)).clamp_min(1)


def best_waves(rates: torch.Tensor, shape, cfg: ScanSettings) -> torch.Tensor:
    """K×C×H×W: per class its best wave by the W×K selection ``rates`` (at ``wave_amplitude``), on every channel."""
    channels, height, width = shape
    waves = cfg.wave_amplitude * plane_waves(height, width, cfg.wave_periods)
    return waves[rates.argmax(0).cpu()].expand(-1, channels, -1, -1).contiguous()


def edge_ratios(rates: torch.Tensor) -> torch.Tensor:
    """Per class, from the W×K selection rates of :func:`plane_waves`: the rate of its best wave at the band's top
    frequency (its last ``WAVES_PER_FREQUENCY`` waves) over the rate of its best wave. Near 1 the class's
    response is still rising at the edge of the band: fine texture (deer, cat), not a sine trigger, whose response
    peaks at its own frequency (BENCHMARKS.md, "the wave kind's edge rule")."""
    return rates[-WAVES_PER_FREQUENCY:].max(0).values / rates.max(0).values.clamp_min(1e-9)


def wave_verdict(flips: np.ndarray, edge_ratio, cfg: ScanSettings,
                 scrambled=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The wave kind's (anomalous, texture, sink) per class: anomalous when the best wave flips ≥ ``wave_threshold``
    of held-out images, the edge rule (``wave_edge_ratio``) does not call the class's response texture and the
    structure control does not call the class a sink: its wave, pixels shuffled, still flips ≥ ``wave_scrambled_max``
    and its response is not tuned to one frequency (edge ratio ≥ ``wave_sink_edge_min``). ``edge_ratio`` or
    ``scrambled`` None (scans stored before the rule): nothing is set aside by it."""
    texture, sink = np.zeros(len(flips), bool), np.zeros(len(flips), bool)
    if edge_ratio is not None and cfg.wave_edge_ratio is not None:
        texture = np.asarray(edge_ratio, dtype=float) >= cfg.wave_edge_ratio
    if scrambled is not None and cfg.wave_scrambled_max is not None:
        sink = np.asarray(scrambled, dtype=float) >= cfg.wave_scrambled_max
        if edge_ratio is not None and cfg.wave_sink_edge_min is not None:
            sink &= np.asarray(edge_ratio, dtype=float) >= cfg.wave_sink_edge_min
    return (np.asarray(flips) >= cfg.wave_threshold) & ~texture & ~sink, texture, sink
