"""The built-in trigger suite (ALGORITHMS.md §5): deterministic, batched stamps on [0,1] N×C×H×W tensors.

Every trigger scales with the image: the unit ``u = max(1, round(min(H, W) / 32))`` turns a 32-px design into u-px
cells. Random patterns come from their own fixed seeds (part of the definition, independent of ``--seed``), are drawn
on the CPU so every device sees the same pattern, and are cached per (size, device).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, UsageError

TriggerFn = Callable[..., torch.Tensor]


@dataclass
class Trigger:
    """A named stamp: ``fn(x, **params)`` on [0,1] N×C×H×W → same shape, clipped to [0,1].

    ``resolve(height, width, **params)`` (optional) turns size-relative defaults into the concrete numbers the audit
    records (e.g. the unit ``u`` and the side of a patch at this resolution).
    """

    name: str
    params: dict[str, Any]
    fn: TriggerFn
    description: str = ""
    resolve: Callable[..., dict] | None = field(default=None, repr=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise DataError(f"trigger {self.name}: expected N×C×H×W images, got shape {tuple(x.shape)}")
        return self.fn(x, **self.params).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def params_at(self, height: int, width: int) -> dict[str, Any]:
        """The parameters as applied to H×W images (what the report records)."""
        resolved = dict(self.params)
        if self.resolve is not None:
            resolved.update(self.resolve(height, width, **self.params))
        return resolved


@dataclass
class _Entry:
    fn: TriggerFn
    defaults: dict[str, Any]
    description: str
    resolve: Callable[..., dict] | None


_REGISTRY: dict[str, _Entry] = {}

# The default audit suite, in report order.
DEFAULT_SUITE: list[str] = ["badnets_grid", "badnets_grid_dbr", "badnets_square", "blend_noise", "blend_strip", "sig",
                            "trojan_patch", "four_corner", "wanet", "low_frequency"]


def _defaults_of(fn: TriggerFn) -> dict[str, Any]:
    """Keyword defaults after the image argument: the trigger's parameters."""
    return {name: p.default for name, p in list(inspect.signature(fn).parameters.items())[1:]
            if p.default is not inspect.Parameter.empty}


def register_trigger(name: str, description: str | None = None, resolve: Callable[..., dict] | None = None):
    """Decorator: add ``fn(x, **params)`` under ``name``; its keyword defaults are the default parameters."""

    def add(fn: TriggerFn) -> TriggerFn:
        text = description or (fn.__doc__ or name).strip().splitlines()[0]
        _REGISTRY[name] = _Entry(fn, _defaults_of(fn), text, resolve)
        return fn

    return add


def _load_entry_points() -> None:
    """Plugins: group ``bdsan.triggers``; an entry point names a Trigger or a function ``fn(x, **params)``."""
    for ep in entry_points(group="bdsan.triggers"):
        if ep.name in _REGISTRY:
            continue
        obj = ep.load()
        if isinstance(obj, Trigger):
            _REGISTRY[ep.name] = _Entry(obj.fn, dict(obj.params), obj.description or f"plugin {ep.value}",
                                        obj.resolve)
        else:
            _REGISTRY[ep.name] = _Entry(obj, _defaults_of(obj), f"plugin {ep.value}", None)


def list_triggers() -> dict[str, str]:
    """Name → one-line description: the built-in suite first, then other registered and plugin triggers."""
    _load_entry_points()
    ordered = [n for n in DEFAULT_SUITE if n in _REGISTRY] + [n for n in _REGISTRY if n not in DEFAULT_SUITE]
    return {name: _REGISTRY[name].description for name in ordered}


def get_trigger(name: str, **param_overrides: Any) -> Trigger:
    """The registered trigger ``name`` with its default parameters, updated by ``param_overrides``."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise UsageError(f"unknown trigger {name!r}", hint="`bdsan triggers` lists them: " + ", ".join(_REGISTRY))
    entry = _REGISTRY[name]
    unknown = sorted(set(param_overrides) - set(entry.defaults))
    if unknown:
        raise UsageError(f"trigger {name!r} has no parameter(s) {', '.join(unknown)}",
                         hint="parameters: " + ", ".join(entry.defaults))
    return Trigger(name, {**entry.defaults, **param_overrides}, entry.fn, entry.description, entry.resolve)


def unit(height: int, width: int) -> int:
    """Scale unit u = max(1, round(min(H, W) / 32)), rounding halves up."""
    return max(1, math.floor(min(height, width) / 32 + 0.5))


# --- building blocks ---------------------------------------------------------------------------------------------

def _cells(pattern: list[list[float]], u: int) -> torch.Tensor:
    """A small cell pattern (rows of values) blown up to u×u pixels per cell."""
    cells = torch.tensor(pattern, dtype=torch.float32)
    return cells.repeat_interleave(u, 0).repeat_interleave(u, 1)


def _paste(x: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Replace a block of every image (all channels) by ``patch`` (h×w or C×h×w), clipped to the image."""
    out = x.clone()
    height, width = x.shape[-2:]
    h, w = patch.shape[-2:]
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, height), min(left + w, width)
    if r1 <= r0 or c1 <= c0:
        return out
    out[:, :, r0:r1, c0:c1] = patch[..., r0 - top:r1 - top, c0 - left:c1 - left].to(x.device, x.dtype)
    return out


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


GRID = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]        # BackdoorBench: checkerboard with white corners
GRID_DBR = [[0, 0, 1], [0, 1, 0], [1, 0, 1]]    # D-BR / T&R: the top-left cell black


def _unit_params(height: int, width: int, **params) -> dict:
    return {"u": params.get("u") or unit(height, width)}


# --- the suite ---------------------------------------------------------------------------------------------------

def _grid_block(x: torch.Tensor, pattern: list[list[float]], u: int | None) -> torch.Tensor:
    height, width = x.shape[-2:]
    u = u or unit(height, width)
    block = _cells(pattern, u)
    return _paste(x, block, height - block.shape[0], width - block.shape[1])


@register_trigger("badnets_grid", "BadNets 3×3 checkerboard (white corners) of u×u cells at the bottom-right corner "
                  "(BackdoorBench)", resolve=_unit_params)
def badnets_grid(x: torch.Tensor, u: int | None = None) -> torch.Tensor:
    return _grid_block(x, GRID, u)


@register_trigger("badnets_grid_dbr", "BadNets 3×3 grid with a black top-left cell (D-BR / Trap-and-Replace), "
                  "bottom-right corner", resolve=_unit_params)
def badnets_grid_dbr(x: torch.Tensor, u: int | None = None) -> torch.Tensor:
    return _grid_block(x, GRID_DBR, u)


def _square_params(height: int, width: int, side: int | None = None, margin: int | None = None,
                   value: float = 1.0) -> dict:
    return {"side": side or max(3, math.floor(0.1 * min(height, width) + 0.5)),
            "margin": unit(height, width) if margin is None else margin}


@register_trigger("badnets_square", "White square of side max(3, 10% of the image), margin u from the "
                  "bottom-right (D-BR squareTrigger)", resolve=_square_params)
def badnets_square(x: torch.Tensor, side: int | None = None, margin: int | None = None,
                   value: float = 1.0) -> torch.Tensor:
    height, width = x.shape[-2:]
    p = _square_params(height, width, side, margin)
    s, m = p["side"], p["margin"]
    return _paste(x, torch.full((s, s), float(value)), height - m - s, width - m - s)


@functools.lru_cache(maxsize=32)
def _uniform_noise(height: int, width: int, seed: int, device: torch.device, channels: int = 1) -> torch.Tensor:
    return torch.rand(channels, height, width, generator=_generator(seed)).to(device)


@register_trigger("blend_noise", "Blend with fixed grayscale uniform noise (seed 20240601), alpha 0.2 (D-BR "
                  "randomPixelTrigger); channels=3: colour noise")
def blend_noise(x: torch.Tensor, alpha: float = 0.2, seed: int = 20240601, channels: int = 1) -> torch.Tensor:
    if channels not in (1, x.shape[-3]):
        raise UsageError(f"blend_noise channels must be 1 (grey) or {x.shape[-3]} (colour), got {channels}")
    noise = _uniform_noise(x.shape[-2], x.shape[-1], seed, x.device, int(channels)).to(x.dtype)
    return torch.lerp(x, noise.unsqueeze(0).expand_as(x), alpha)


def _strip_params(height: int, width: int, alpha: float = 0.2, period: int | None = None) -> dict:
    return {"period": period or 8 * unit(height, width)}


@functools.lru_cache(maxsize=32)
def _stripes(height: int, width: int, period: int, device: torch.device) -> torch.Tensor:
    columns = torch.arange(width)
    row = ((columns // (period // 2)) % 2 == 1).float()
    return row.view(1, 1, 1, width).expand(1, 1, height, width).to(device)


@register_trigger("blend_strip", "Blend with vertical stripes of period 8u starting dark, alpha 0.2 (D-BR "
                  "Blend-Strip)", resolve=_strip_params)
def blend_strip(x: torch.Tensor, alpha: float = 0.2, period: int | None = None) -> torch.Tensor:
    height, width = x.shape[-2:]
    period = _strip_params(height, width, alpha, period)["period"]
    return torch.lerp(x, _stripes(height, width, max(2, period), x.device).to(x.dtype).expand_as(x), alpha)


@register_trigger("sig", "SIG: add a vertical sine of amplitude 40/255 and 6 periods across the width "
                  "(BackdoorBench)")
def sig(x: torch.Tensor, delta: float = 40 / 255, frequency: float = 6.0, axis: str = "columns") -> torch.Tensor:
    """``axis``: ``columns`` (the sine runs across the width, constant down each column: SIG) or ``rows``."""
    if axis not in ("columns", "rows"):
        raise UsageError(f"sig axis {axis!r} is not one of columns, rows")
    length = x.shape[-1] if axis == "columns" else x.shape[-2]
    positions = torch.arange(length, device=x.device, dtype=torch.float32)
    wave = delta * torch.sin(2 * math.pi * positions * frequency / length)
    shape = (1, 1, 1, length) if axis == "columns" else (1, 1, length, 1)
    return x + wave.to(x.dtype).view(shape)


@functools.lru_cache(maxsize=32)
def _trojan_cells(channels: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (channels, 3, 3), generator=_generator(seed)).float() / 255


def _trojan_params(height: int, width: int, side: int | None = None, margin: int | None = None,
                   seed: int = 7) -> dict:
    u = unit(height, width)
    return {"side": side or 3 * u, "margin": 2 * u if margin is None else margin}


@register_trigger("trojan_patch", "Fixed random-colour 3×3-cell patch (seed 7), side 3u, margin 2u, pasted at the "
                  "bottom-right (D-BR trojanTrigger layout)", resolve=_trojan_params)
def trojan_patch(x: torch.Tensor, side: int | None = None, margin: int | None = None, seed: int = 7) -> torch.Tensor:
    height, width = x.shape[-2:]
    p = _trojan_params(height, width, side, margin)
    s, m = p["side"], p["margin"]
    cells = _trojan_cells(x.shape[1], seed)
    patch = F.interpolate(cells.unsqueeze(0), size=(s, s), mode="nearest")[0]
    return _paste(x, patch, height - m - s, width - m - s)


@register_trigger("four_corner", "The D-BR grid block translated into all four corners (Trap-and-Replace cl)",
                  resolve=_unit_params)
def four_corner(x: torch.Tensor, u: int | None = None) -> torch.Tensor:
    height, width = x.shape[-2:]
    block = _cells(GRID_DBR, u or unit(height, width))
    b = block.shape[0]
    out = x
    for top, left in ((0, 0), (0, width - b), (height - b, 0), (height - b, width - b)):
        out = _paste(out, block, top, left)
    return out


@functools.lru_cache(maxsize=32)
def _wanet_grid(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int,
                device: torch.device) -> torch.Tensor:
    field_ = torch.rand(1, 2, k, k, generator=_generator(seed)) * 2 - 1
    field_ = field_ / field_.abs().mean()
    field_ = F.interpolate(field_, size=(height, width), mode="bicubic", align_corners=True)
    field_ = field_.permute(0, 2, 3, 1)  # 1×H×W×2, (x, y) order as grid_sample expects
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((cols, rows), dim=2).unsqueeze(0)
    scale = torch.tensor([width, height], dtype=torch.float32)
    grid = ((identity + s * field_ / scale) * grid_rescale).clamp(-1, 1)
    return grid.to(device)


@register_trigger("wanet", "WaNet warp: fixed random 4×4 field (seed 1234), strength 0.5 (BackdoorBench "
                  "defaults)")
def wanet(x: torch.Tensor, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, seed: int = 1234) -> torch.Tensor:
    height, width = x.shape[-2:]
    grid = _wanet_grid(height, width, k, s, grid_rescale, seed, x.device).to(x.dtype)
    return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear", align_corners=True)


@functools.lru_cache(maxsize=32)
def _low_frequency_pattern(channels: int, height: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    noise = torch.randn(channels, height, width, generator=_generator(seed), dtype=torch.float64)
    sigma = min(height, width) / 8
    fy = torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64).view(1, -1)
    gain = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))  # Gaussian blur, periodic boundary
    low = torch.fft.irfft2(torch.fft.rfft2(noise) * gain, s=(height, width))
    return (low / low.abs().max()).float().unsqueeze(0).to(device)


@register_trigger("low_frequency", "Add fixed low-pass Gaussian noise (sigma = size/8, seed 99) scaled to "
                  "max 0.1 [ours]")
def low_frequency(x: torch.Tensor, epsilon: float = 0.1, seed: int = 99) -> torch.Tensor:
    pattern = _low_frequency_pattern(x.shape[1], x.shape[-2], x.shape[-1], seed, x.device)
    return x + epsilon * pattern.to(x.dtype)


# --- the sweep (ALGORITHMS.md §5 "Sweep [ours]") -------------------------------------------------------------------

POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "centre")
CONTENTS = ("white", "black", "checkerboard", "random")


def _patch_params(height: int, width: int, side: int | None = None, margin: int | None = None,
                  position: str = "bottom_right", content: str = "white", seed: int = 7, top: int | None = None,
                  left: int | None = None) -> dict:
    u = unit(height, width)
    params = {"side": side or 3 * u, "margin": u if margin is None else margin, "u": u}
    return params | {k: v for k, v in (("top", top), ("left", left)) if v is not None}


@functools.lru_cache(maxsize=64)
def _patch_content(content: str, channels: int, side: int, u: int, seed: int) -> torch.Tensor:
    cells = -(-side // u)
    if content == "white":
        return torch.ones(channels, side, side)
    if content == "black":
        return torch.zeros(channels, side, side)
    if content == "checkerboard":
        board = (torch.arange(cells).view(-1, 1) + torch.arange(cells).view(1, -1)) % 2 == 0
        pattern = board.float().repeat_interleave(u, 0).repeat_interleave(u, 1)
    elif content == "random":
        pattern = torch.randint(0, 256, (channels, cells, cells), generator=_generator(seed)).float() / 255
        pattern = pattern.repeat_interleave(u, 1).repeat_interleave(u, 2)
    else:
        raise UsageError(f"patch content {content!r} is not one of {', '.join(CONTENTS)}")
    return pattern[..., :side, :side].expand(channels, side, side).contiguous()


@register_trigger("patch", "Generic square patch: side, margin, position (corners/centre) and content (white, "
                  "black, checkerboard, random colours) — the sweep's building block", resolve=_patch_params)
def patch(x: torch.Tensor, side: int | None = None, margin: int | None = None, position: str = "bottom_right",
          content: str = "white", seed: int = 7, top: int | None = None, left: int | None = None) -> torch.Tensor:
    """``top``/``left`` (pixels) place the patch anywhere and override ``position``/``margin`` on that axis."""
    height, width = x.shape[-2:]
    p = _patch_params(height, width, side, margin)
    s, m = p["side"], p["margin"]
    if position not in POSITIONS:
        raise UsageError(f"patch position {position!r} is not one of {', '.join(POSITIONS)}")
    if top is None:
        top = {"bottom": height - m - s, "top": m, "centre": (height - s) // 2}[position.split("_")[0]]
    if left is None:
        left = {"right": width - m - s, "left": m, "centre": (width - s) // 2}[position.split("_")[-1]]
    if not (0 <= top <= height - s and 0 <= left <= width - s):
        raise UsageError(f"patch at top={top}, left={left} with side {s} does not fit a {height}×{width} image")
    return _paste(x, _patch_content(content, x.shape[1], s, p["u"], seed), top, left)


def sweep_families(height: int, width: int) -> dict[str, tuple[str, list[Trigger]]]:
    """Per family: (canonical suite trigger, its variants). Patches over the four corners at margins 0–3u and the
    centre, sides 3u–6u, four contents; blends over alpha 0.1/0.2/0.3; SIG over 4/6/8 periods."""
    u = unit(height, width)
    patches = [get_trigger("patch", side=k * u, margin=m * u, position=position, content=content)
               for position in POSITIONS for m in (range(4) if position != "centre" else (0,))
               for k in (3, 4, 5, 6) for content in CONTENTS]
    blends = [get_trigger(name, alpha=alpha) for name in ("blend_noise", "blend_strip") for alpha in (0.1, 0.2, 0.3)]
    sigs = [get_trigger("sig", frequency=f) for f in (4.0, 6.0, 8.0)]
    return {"patch": ("badnets_square", patches), "blend": ("blend_noise", blends), "sig": ("sig", sigs)}


# --- user triggers -----------------------------------------------------------------------------------------------

def _read_png(path: str | Path, mode: str) -> torch.Tensor:
    """A picture as float C×H×W in [0,1] (Pillow, decompression-bomb limit on)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"trigger file not found: {path}")
    try:
        with Image.open(path) as image:
            array = torch.from_numpy(np.asarray(image.convert(mode)).copy())
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read trigger image {path}: {exc}") from None
    array = array.float() / 255
    return array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def user_trigger(image_path: str | Path, mask_path: str | Path | None = None, alpha: float | None = None) -> Trigger:
    """A trigger from a picture (``--trigger-image/--trigger-mask/--trigger-alpha``).

    Resized (nearest) to the images it is applied to. Without a mask, pixels where the picture is > 0 in any channel
    are pasted (BackdoorBench ``AddMaskPatchTrigger``); with a mask, pixels where the mask is > 0. With ``alpha`` the
    picture is blended, x' = (1 − α)x + α·T, inside the mask (everywhere when no mask is given).
    """
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--trigger-alpha must be in [0, 1], got {alpha}")
    picture = _read_png(image_path, "RGB")
    if mask_path is not None:
        mask = _read_png(mask_path, "L") > 0
    elif alpha is not None:
        mask = torch.ones_like(picture[:1], dtype=torch.bool)
    else:
        mask = (picture > 0).any(dim=0, keepdim=True)
    if mask.shape[-2:] != picture.shape[-2:]:
        mask = F.interpolate(mask.float().unsqueeze(0), size=picture.shape[-2:], mode="nearest")[0] > 0
    if not mask.any():
        raise DataError(f"trigger {image_path}: nothing to stamp (the picture/mask is all zero)",
                        hint="use a mask PNG that is white where the trigger is, or --trigger-alpha to blend")

    @functools.lru_cache(maxsize=8)
    def resized(channels: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.interpolate(picture.unsqueeze(0), size=(height, width), mode="nearest")
        m = F.interpolate(mask.float().unsqueeze(0), size=(height, width), mode="nearest") > 0
        if channels == 1:
            t = t.mean(dim=1, keepdim=True)
        return t.to(device), m.to(device)

    def stamp(x: torch.Tensor, **_params) -> torch.Tensor:
        t, m = resized(x.shape[1], x.shape[-2], x.shape[-1], x.device)
        t = t.to(x.dtype)
        stamped = t if alpha is None else torch.lerp(x, t.expand_as(x), alpha)
        return torch.where(m, stamped, x)

    params = {"image": str(image_path), "image_sha256": _sha256(image_path),
              "mask": str(mask_path) if mask_path is not None else None, "alpha": alpha}
    return Trigger("user", params, stamp, "user trigger from " + Path(image_path).name)


def resolve_triggers(triggers: list[str | Trigger] | None) -> list[Trigger]:
    """Names or Trigger objects → Trigger objects (None → the default suite)."""
    if triggers is None:
        triggers = list(DEFAULT_SUITE)
    return [t if isinstance(t, Trigger) else get_trigger(t) for t in triggers]
