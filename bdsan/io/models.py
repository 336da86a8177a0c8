"""Safe model loading (SPEC §2.1): formats recognised by content; untrusted files are data, never code.

The flow: ``sniff_format`` (bytes) → a reader that returns a ``ModelFile`` (tensors + what the file says about
itself, no module built) → ``resolve`` (architecture, classes, preprocessing from the command line, the file's
metadata or a ``config.json`` beside it) → ``load_state_dict_into``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelRefused
from . import sniff
from .archs import build_arch
from .pickle_scan import NUMPY_DATA_GLOBALS, PickleScan, scan_file
from .preprocess import PRESETS, Normalized, Preprocessing

log = logging.getLogger("bdsan")


@dataclass
class LoadedModel:
    """A model ready for bdsan: the raw torch module (None for ONNX) plus what is known about it."""

    module: nn.Module | None
    arch: str
    num_classes: int
    preprocessing: Preprocessing
    format: str
    path: str = ""
    sha256: str = ""
    classes: list[str] | None = None
    onnx_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # where arch / num_classes / preprocessing came from

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) if self.module is not None else 0

    def normalized(self) -> Normalized:
        """The module wrapped so it takes [0,1] pixels."""
        if self.module is None:
            raise ModelRefused(f"{self.path}: ONNX models can be audited and checked, not defended")
        return Normalized(self.module, self.preprocessing)

    def info(self) -> dict:
        """The report's ``model`` object (SPEC §5)."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "arch": self.arch,
                "num_classes": self.num_classes, "params": self.params,
                "preprocessing": self.preprocessing.to_dict(), "warnings": list(self.warnings)}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def from_module(module: nn.Module, arch: str, num_classes: int, preprocessing: Preprocessing,
                classes: list[str] | None = None) -> LoadedModel:
    """Wrap an in-memory module (Python API use and tests)."""
    return LoadedModel(module.eval(), arch, num_classes, preprocessing, "module", classes=classes)


def load_state_dict_into(arch: str, num_classes: int, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``arch`` and load ``state_dict`` strictly, with a readable list of mismatches."""
    module = build_arch(arch, num_classes)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs {arch} {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")
        parts = [f"missing {len(missing)}: {head(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {head(unexpected)}" if unexpected else "",
                 f"shape mismatch {len(shapes)}: {head(shapes)}" if shapes else ""]
        raise ModelRefused(f"weights do not fit architecture {arch!r} — " + "; ".join(p for p in parts if p),
                           hint="check --arch and --num-classes (`bdsan archs` lists architectures)")
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


class UnsafeModel(ModelRefused):
    """The file would run code when loaded (TorchScript, pickled modules): refused unless ``trust_code``."""

    def __init__(self, path: Path, fmt: str, scan: PickleScan):
        self.format = fmt
        self.globals = scan.unsafe or scan.globals
        kind = "a TorchScript archive (it carries its own code)" if fmt == sniff.TORCHSCRIPT else \
            "a pickle that imports code"
        shown = ", ".join(self.globals[:12]) + (f" … (+{len(self.globals) - 12})" if len(self.globals) > 12 else "")
        super().__init__(f"{path}: refused: {kind}; loading it would import {shown or 'unknown globals'}",
                         hint="nothing was loaded. Only if you trust the file's origin, rerun with --trust-code "
                              "(it runs code from the file); better, ask for a state dict or safetensors file")


# --- reading the file: tensors and what the file says about itself ----------------------------------------------

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.")

# BackdoorBench ``model_name`` → bdsan architecture (names are compared lower-case without ``_``/``-``).
BACKDOORBENCH_ARCHS = {"preactresnet18": "preact_resnet18", "preact": "preact_resnet18",
                       "preactresnet": "preact_resnet18", "resnet18": "resnet18"}
# BackdoorBench normalises per dataset (utils/dataset_preprocess); the bundle names the dataset in data_path.
BACKDOORBENCH_NORMALIZATION = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": PRESETS["none"], "celeba": PRESETS["none"],
}


@dataclass
class ModelFile:
    """A model file read safely: weights (or, with trust_code, a module) plus the facts the file states."""

    path: Path
    format: str
    sha256: str
    bytes: int
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # arch / num_classes / classes / preprocessing
    fact_source: str = ""                                 # where ``facts`` came from
    globals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_model_file(path: str | Path, trust_code: bool = False) -> ModelFile:
    """Sniff and read ``path`` without running code from it (unless ``trust_code``)."""
    path = Path(path)
    fmt = sniff.sniff_format(path)
    file = ModelFile(path, fmt, sha256_file(path), path.stat().st_size)
    if fmt == sniff.SAFETENSORS:
        _read_safetensors(file)
    elif fmt == sniff.ONNX:
        _read_onnx(file)
    else:
        _read_pickled(file, trust_code)
    if file.state_dict is not None:
        file.state_dict = strip_prefixes(file.state_dict)
        if not file.state_dict:
            raise ModelRefused(f"{path}: no tensors in the file")
    return file


def _read_safetensors(file: ModelFile) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file.path), framework="pt") as handle:
            file.metadata = dict(handle.metadata() or {})
            file.state_dict = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 — not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelRefused(f"{file.path}: corrupt safetensors file ({exc})") from None
    file.facts, file.fact_source = _facts_from_metadata(file.metadata, file.path), "metadata"


def _read_onnx(file: ModelFile) -> None:
    try:
        import onnx
    except ImportError:
        raise ModelRefused("reading ONNX needs the onnx package", hint="pip install onnx") from None
    try:
        proto = onnx.load(str(file.path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 — protobuf errors have many types
        raise ModelRefused(f"{file.path}: corrupt ONNX file ({exc})") from None
    file.metadata = {p.key: p.value for p in proto.metadata_props}
    facts = _facts_from_metadata(file.metadata, file.path)
    dims = _static_dims(proto.graph.output[0]) if proto.graph.output else []
    if "num_classes" not in facts and dims and dims[-1] > 0:
        facts["num_classes"] = dims[-1]
    in_dims = _static_dims(proto.graph.input[0]) if proto.graph.input else []
    if "preprocessing" not in facts and len(in_dims) == 4 and in_dims[-1] > 0 and in_dims[-1] == in_dims[-2]:
        facts["input_size"] = in_dims[-1]
    file.facts, file.fact_source = facts, "metadata"
    file.facts.setdefault("params", sum(_numel(t.dims) for t in proto.graph.initializer))


def _static_dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= int(d)
    return count


def _read_pickled(file: ModelFile, trust_code: bool) -> None:
    scan = scan_file(file.path)
    file.globals = scan.globals
    if scan.error and file.format == sniff.PICKLE:
        raise ModelRefused(f"{file.path}: not a readable checkpoint ({scan.error})")
    needs_code = file.format == sniff.TORCHSCRIPT or bool(scan.unsafe)
    if needs_code and not trust_code:
        raise UnsafeModel(file.path, file.format, scan)
    if needs_code:
        obj = _load_trusted(file)
        file.warnings.append(f"--trust-code: ran code from {file.path.name} while loading "
                             f"({file.format}; imports {', '.join((scan.unsafe or scan.globals)[:6])})")
    else:
        obj = _load_weights_only(file.path, scan)
    _interpret(file, obj)


def _load_weights_only(path: Path, scan: PickleScan) -> Any:
    """``torch.load(weights_only=True)``; numpy arrays (data) are allowed by exact name, nothing else is added."""
    extra = [(_import_numpy_global(name), name) for name in scan.globals
             if name in NUMPY_DATA_GLOBALS or name.startswith("numpy.dtypes.")]
    if extra:  # an array's dtype class is rebuilt from its dtype, not named in the pickle
        import numpy

        extra += [(cls, f"numpy.dtypes.{cls.__name__}") for cls in vars(numpy.dtypes).values()
                  if isinstance(cls, type) and cls.__name__.endswith("DType")]
    try:
        with torch.serialization.safe_globals([e for e in extra if e[0] is not None]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — the weights-only unpickler raises several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRefused(f"{path}: cannot be read as weights only ({first[:300]})",
                           hint="nothing from the file was run; re-save it as a state dict or safetensors") from None


def _import_numpy_global(name: str):
    module, _, attr = name.rpartition(".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _load_trusted(file: ModelFile) -> Any:
    """Only with --trust-code: the file's own code runs."""
    log.warning("warning: --trust-code: loading %s runs code from the file", file.path)
    try:
        if file.format == sniff.TORCHSCRIPT:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                return torch.jit.load(str(file.path), map_location="cpu")
        try:
            return torch.load(str(file.path), map_location="cpu", weights_only=False)
        except pickle.UnpicklingError as exc:
            if "magic number" not in str(exc):
                raise
            with open(file.path, "rb") as handle:  # a plain pickle, not a torch.save file
                return pickle.load(handle)
    except Exception as exc:  # noqa: BLE001 — the file's code can raise anything
        raise ModelRefused(f"{file.path}: loading with --trust-code failed: {type(exc).__name__}: {exc}") from None


def _interpret(file: ModelFile, obj: Any, depth: int = 0) -> None:
    """A module, a BackdoorBench bundle, a checkpoint wrapper or a state dict."""
    if isinstance(obj, nn.Module):
        file.module = obj.eval()
        file.state_dict = None
        return
    if not isinstance(obj, dict):
        raise ModelRefused(f"{file.path}: holds a {type(obj).__name__}, not a state dict")
    if {"model_name", "num_classes", "model"} <= set(obj) and depth == 0:
        file.format = "backdoorbench"
        file.facts, file.fact_source = _facts_from_backdoorbench(obj, file), "BackdoorBench bundle"
        return _interpret(file, obj["model"], depth + 1)
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], (dict, nn.Module)) and depth < 3:
            return _interpret(file, obj[key], depth + 1)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ModelRefused(f"{file.path}: no state dict found (top-level keys: {keys})",
                           hint="expected a state dict, or a dict with state_dict / model / model_state_dict / net")
    dropped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        file.warnings.append(f"ignored non-tensor entries: {', '.join(dropped[:8])}")
    file.state_dict = tensors


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` from every key."""
    result = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        result[key] = value
    return result


def _facts_from_metadata(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """bdsan's own keys first; the flat ``mean``/``std``/``input_size`` keys other tools write as a fallback."""
    from . import metadata as keys

    facts: dict[str, Any] = {}
    try:
        if metadata.get(keys.ARCH):
            facts["arch"] = metadata[keys.ARCH]
        if metadata.get(keys.NUM_CLASSES):
            facts["num_classes"] = int(metadata[keys.NUM_CLASSES])
        classes = keys.read_classes(metadata)
        if classes:
            facts["classes"] = [str(c) for c in classes]
        preprocessing = keys.read_preprocessing(metadata)
        if preprocessing is None and "mean" in metadata and "std" in metadata:
            size = metadata.get("input_size") or None
            preprocessing = Preprocessing(tuple(json.loads(metadata["mean"])), tuple(json.loads(metadata["std"])),
                                          int(size) if size else None)
        if preprocessing is not None:
            facts["preprocessing"] = preprocessing
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelRefused(f"{path}: unreadable bdsan metadata ({exc})") from None
    return facts


def _facts_from_backdoorbench(bundle: dict, file: ModelFile) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    name = str(bundle.get("model_name", ""))
    arch = BACKDOORBENCH_ARCHS.get(name.lower().replace("_", "").replace("-", ""))
    if arch is None and _is_registered(name):
        arch = name
    if arch:
        facts["arch"] = arch
    else:
        file.warnings.append(f"BackdoorBench model_name {name!r} has no bdsan architecture; pass --arch")
    try:
        facts["num_classes"] = int(bundle["num_classes"])
    except (TypeError, ValueError):
        pass
    size = bundle.get("img_size")
    input_size = int(size[0]) if isinstance(size, (list, tuple)) and size else None
    data_path = str(bundle.get("data_path", "")).lower()
    for dataset, (mean, std) in BACKDOORBENCH_NORMALIZATION.items():
        if dataset in data_path:
            facts["preprocessing"] = Preprocessing(mean, std, input_size)
            file.warnings.append(f"preprocessing guessed from the bundle's data_path ({dataset}: BackdoorBench's "
                                 f"normalisation); override with --preset/--mean/--std")
            break
    else:
        if input_size:
            facts["input_size"] = input_size
    file.metadata = {k: str(bundle[k]) for k in ("model_name", "num_classes", "img_size", "data_path")
                     if k in bundle}
    return facts


def _is_registered(name: str) -> bool:
    from .archs import list_archs

    return name in list_archs()


def read_config_json(model_path: Path) -> dict[str, Any]:
    """``config.json`` beside the model: {"arch", "num_classes", "classes", "preset" | "mean"+"std", "input_size"}.

    A config.json without any of these keys (e.g. a Hugging Face one) is ignored.
    """
    path = model_path.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelRefused(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        return {}
    facts: dict[str, Any] = {}
    try:
        if data.get("arch"):
            facts["arch"] = str(data["arch"])
        if data.get("num_classes") is not None:
            facts["num_classes"] = int(data["num_classes"])
        if data.get("classes"):
            facts["classes"] = [str(c) for c in data["classes"]]
        size = int(data["input_size"]) if data.get("input_size") else None
        if data.get("preset"):
            facts["preprocessing"] = Preprocessing.preset(str(data["preset"]), size)
        elif data.get("mean") is not None and data.get("std") is not None:
            facts["preprocessing"] = Preprocessing(tuple(float(v) for v in data["mean"]),
                                                   tuple(float(v) for v in data["std"]), size)
        elif size:
            facts["input_size"] = size
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelRefused(f"{path}: bad value ({exc})",
                           hint='expected {"arch": str, "num_classes": int, "classes": [str], '
                                '"preset": "cifar10|imagenet|none" or "mean"/"std": [float], "input_size": int}') from None
    return facts


# --- deciding architecture, classes and preprocessing -------------------------------------------------------------

CLASSIFIER_NAMES = ("fc", "linear", "classifier", "head", "heads", "last_linear", "logits", "output", "out")


def infer_num_classes(state_dict: dict[str, torch.Tensor], arch: str | None = None) -> tuple[int | None, str]:
    """Classes from the classifier weights: the keys that scale with ``num_classes`` in ``arch``, else by name."""
    if arch:
        probe = 997
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = build_arch(arch, probe).state_dict()
            keys = [k for k, v in built.items() if v.ndim >= 1 and v.shape[0] == probe and k in state_dict]
            sizes = {int(state_dict[k].shape[0]) for k in keys}
            if len(sizes) == 1:
                return sizes.pop(), f"inferred from {keys[0]}"
        except Exception as exc:  # noqa: BLE001 — the architecture failed to build: fall back to names
            log.debug("num_classes probe of %s failed: %s", arch, exc)
    matrices = [k for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 2 and v.is_floating_point()]
    if not matrices:
        return None, ""
    named = [k for k in matrices if any(part in CLASSIFIER_NAMES or part.startswith("classifier")
                                        for part in k.split(".")[:-1])]
    key = (named or matrices)[-1]
    return int(state_dict[key].shape[0]), f"inferred from {key}"


def count_weights(state_dict: dict[str, torch.Tensor]) -> int:
    """Parameters in a state dict (BatchNorm running statistics excluded)."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in state_dict.items() if not k.endswith(skip) and v.is_floating_point())


@dataclass
class Resolved:
    arch: str | None
    num_classes: int | None
    preprocessing: Preprocessing
    classes: list[str] | None
    sources: dict[str, str]
    warnings: list[str]


def resolve(file: ModelFile, arch: str | None = None, num_classes: int | None = None,
            preprocessing: Preprocessing | None = None, trust_code: bool = False) -> Resolved:
    """Command line > the file's metadata (or bundle) > config.json beside it > inference / defaults."""
    config = read_config_json(file.path) if file.format != sniff.ONNX else {}
    layers = [("command line", {"arch": arch, "num_classes": num_classes, "preprocessing": preprocessing}),
              (file.fact_source or "file", file.facts), ("config.json", config)]
    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, facts in layers:
        for key in ("arch", "num_classes", "classes", "preprocessing", "input_size"):
            if facts.get(key) is not None and key not in chosen:
                chosen[key], sources[key] = facts[key], source
    notes: list[str] = []
    arch_spec = chosen.get("arch")
    if arch_spec and ":" in arch_spec and sources["arch"] != "command line" and not trust_code:
        raise ModelRefused(f"{file.path}: the {sources['arch']} names the code factory {arch_spec!r}; bdsan does not "
                           "run code named by a model's own files",
                           hint=f"if you trust it, pass --arch {arch_spec} yourself")
    if file.module is not None and not arch_spec:
        name = getattr(file.module, "original_name", None) or type(file.module).__name__
        kind = "torchscript" if file.format == sniff.TORCHSCRIPT else "pickled"
        arch_spec, sources["arch"] = f"{kind}:{name}", "module in the file"
    if file.format == sniff.ONNX and not arch_spec:
        arch_spec, sources["arch"] = "onnx", "default"
    classes_count = chosen.get("num_classes")
    if classes_count is None:
        weights = file.state_dict if file.state_dict is not None else (
            file.module.state_dict() if file.module is not None else None)
        inferred, how = infer_num_classes(weights, arch_spec) if weights else (None, "")
        if inferred is None and file.format == sniff.ONNX:
            raise ModelRefused(f"{file.path}: number of classes unknown", hint="pass --num-classes N")
        classes_count = inferred
        if how:
            sources["num_classes"] = how
    prep = chosen.get("preprocessing")
    if prep is None:
        size = chosen.get("input_size")
        prep = Preprocessing(input_size=size)
        sources["preprocessing"] = "default"
        notes.append("no preprocessing in the file's metadata: assuming mean 0 / std 1 "
                     "(pass --preset or --mean/--std if the model was trained on normalised inputs)")
    elif sources.get("preprocessing") == "command line" and prep.input_size is None:
        size = next((f.get("input_size") or (f["preprocessing"].input_size if f.get("preprocessing") else None)
                     for _, f in layers[1:] if f.get("input_size") or f.get("preprocessing")), None)
        if size:
            prep = Preprocessing(prep.mean, prep.std, size)
    names = chosen.get("classes")
    if names and classes_count and len(names) != classes_count:
        raise ModelRefused(f"{file.path}: {len(names)} class names ({sources['classes']}) but "
                           f"{classes_count} classes ({sources['num_classes']})")
    return Resolved(arch_spec, classes_count, prep, names, sources, notes)


# --- the public loader --------------------------------------------------------------------------------------------

def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               preprocessing: Preprocessing | None = None, trust_code: bool = False) -> LoadedModel:
    """Load a model file safely (SPEC §2.1). ``preprocessing`` overrides what the file's metadata says.

    ``arch`` / ``num_classes`` override the file's metadata, which overrides a ``config.json`` beside the file;
    ``num_classes`` is otherwise inferred from the classifier weights. ONNX files give ``module=None``.
    Raises ``ModelRefused`` (exit 3) for unsafe, unreadable or mismatched files; never falls back to unsafe loading.
    """
    file = read_model_file(path, trust_code)
    return build_loaded(file, resolve(file, arch, num_classes, preprocessing, trust_code))


def build_loaded(file: ModelFile, spec: Resolved) -> LoadedModel:
    """Build the module for a read file and its resolved architecture."""
    module = None
    if file.format == sniff.ONNX:
        pass
    elif file.module is not None:
        module = file.module
        inferred, _ = infer_num_classes(module.state_dict())
        if spec.num_classes and inferred and inferred != spec.num_classes:
            raise ModelRefused(f"{file.path}: the module has {inferred} outputs, not {spec.num_classes}")
    elif not spec.arch:
        raise ModelRefused(f"{file.path}: no architecture known ({file.format} weights, no bdsan metadata, "
                           "no config.json beside it)",
                           hint="pass --arch NAME (`bdsan archs`) or --arch my_arch.py:build")
    elif not spec.num_classes:
        raise ModelRefused(f"{file.path}: cannot infer the number of classes", hint="pass --num-classes N")
    else:
        module = load_state_dict_into(spec.arch, spec.num_classes, file.state_dict)
    return LoadedModel(module, spec.arch or "unknown", int(spec.num_classes or 0), spec.preprocessing,
                       file.format, str(file.path), file.sha256, spec.classes,
                       onnx_path=str(file.path) if file.format == sniff.ONNX else None,
                       warnings=[*file.warnings, *spec.warnings], sources=dict(spec.sources))


def inspect_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
                  preprocessing: Preprocessing | None = None, trust_code: bool = False) -> tuple[dict, LoadedModel | None]:
    """What ``bdsan inspect`` reports. Refusals of unsafe files come back as data (``safe: False``);
    other errors (missing, corrupt, mismatched) raise ``ModelRefused``."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path), "format": None, "sha256": None, "bytes": None, "safe": True,
                            "loaded": False, "arch": None, "num_classes": None, "classes": None, "params": None,
                            "preprocessing": None, "sources": {}, "metadata": {}, "globals": [],
                            "unsafe_globals": [], "warnings": [], "problem": None}
    try:
        file = read_model_file(path, trust_code)
    except UnsafeModel as refused:
        scan = scan_file(path)
        info.update(format=refused.format, sha256=sha256_file(path), bytes=path.stat().st_size, safe=False,
                    globals=scan.globals, unsafe_globals=refused.globals, problem=refused.message)
        return info, None
    spec = resolve(file, arch, num_classes, preprocessing, trust_code)
    info.update(format=file.format, sha256=file.sha256, bytes=file.bytes, metadata=dict(file.metadata),
                globals=list(file.globals), safe=not any(w.startswith("--trust-code") for w in file.warnings),
                unsafe_globals=[g for g in file.globals if g in PickleScan(file.globals).unsafe],
                arch=spec.arch, num_classes=spec.num_classes, classes=spec.classes,
                preprocessing=spec.preprocessing.to_dict(), sources=dict(spec.sources),
                warnings=[*file.warnings, *spec.warnings])
    if file.format == sniff.ONNX:
        info["params"] = file.facts.get("params")
    elif file.state_dict is not None:
        info["params"] = count_weights(file.state_dict)
    if file.format != sniff.ONNX and file.module is None and not spec.arch:
        info["problem"] = "no architecture known: pass --arch NAME to load it"
        return info, None
    loaded = build_loaded(file, spec)
    info["loaded"] = True
    if loaded.module is not None:
        info["params"] = loaded.params
    return info, loaded
