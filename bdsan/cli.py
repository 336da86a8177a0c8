"""The ``bdsan`` command line: parses options, calls the Python API, renders reports, maps exit codes."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .allocator import keep_freed_memory
from .atomic import write_text_atomic
from .config import default_map_for, env_var_name, find_config_arg, load_config_file
from .errors import EXIT_INTERRUPTED, EXIT_RUN, EXIT_USAGE, BdsanError
from .progress import set_quiet
from .report import Report, render_json, render_text

log = logging.getLogger("bdsan")


class BdsanCommand(click.Command):
    """Every option also reads ``BDSAN_<OPTION>`` from the environment (SPEC §3.2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, click.Option) and param.envvar is None and param.name:
                param.envvar = env_var_name(param)


class BdsanGroup(click.Group):
    command_class = BdsanCommand


def common_options(func):
    """Options shared by every command (SPEC §3.2)."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N (auto = CUDA when available)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for splits, data order and initialisation."),
        click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Images per forward pass."),
        click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="stdout format; with json nothing but the JSON report goes to stdout."),
        click.option("-o", "--report", "report_path", type=click.Path(dir_okay=False), default=None,
                     help="Also write the report to this file (.json; .sarif / .xml for audit and scan)."),
        click.option("--config", type=click.Path(dir_okay=False), default=None, expose_value=False,
                     help="TOML or YAML file of option defaults (keys = option names)."),
        click.option("--quiet", is_flag=True, help="No progress bars, no log lines below warnings."),
        click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        quiet = kwargs.get("quiet", False)
        set_quiet(quiet)
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr,
                            force=True)
        logging.getLogger("bdsan").setLevel(logging.DEBUG if kwargs.get("debug") else
                                            logging.WARNING if quiet else logging.INFO)
        if kwargs.get("report_path"):
            check_report_path(kwargs["report_path"])
        if kwargs.get("output_format") != "json":
            return func(*args, **kwargs)
        # JSON mode: anything a library prints goes to stderr; only emit() writes the report to stdout.
        global _REPORT_STREAM
        _REPORT_STREAM = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return func(*args, **kwargs)
        finally:
            _REPORT_STREAM = None

    return wrapper


def model_options(func):
    """Options that say how to read MODEL (SPEC §2.1, §2.2, §2.4)."""
    options = [
        click.option("--arch", default=None, help="Architecture name (`bdsan archs`), file.py:factory or pkg.module:factory. "
                     "Default: from the file's metadata or a config.json beside it."),
        click.option("--num-classes", type=click.IntRange(1), default=None, help="Default: inferred from the weights."),
        click.option("--trust-code", is_flag=True, help="Allow TorchScript / pickled modules: runs code from the file."),
        click.option("--preset", type=click.Choice(["cifar10", "imagenet", "none"]), default=None,
                     help="Normalisation preset (default: the file's metadata, else none)."),
        click.option("--mean", default=None, help="Per-channel mean, e.g. 0.4914,0.4822,0.4465."),
        click.option("--std", default=None, help="Per-channel std, e.g. 0.2470,0.2435,0.2616."),
        click.option("--input-size", type=click.IntRange(1), default=None,
                     help="Resize holdout images to this size (otherwise a size mismatch is an error)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def holdout_options(func):
    """Options that say how to read the clean holdout (SPEC §2.3)."""
    options = [
        click.option("--holdout", required=True, type=click.Path(), help="Clean labelled images: ImageFolder dir or .npz."),
        click.option("--split", "data_split", type=click.Choice(["train", "test"]), default=None,
                     help="For .npz files with x_train/x_test keys."),
        click.option("--classes", default=None, help="Comma-separated class folder names, in label order."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


def preprocessing_from_options(preset, mean, std, input_size):
    """A Preprocessing when the command line sets the normalisation, else None (the file's metadata decides).

    ``--input-size`` alone keeps the file's mean/std (``load_model_from_options`` applies it afterwards).
    """
    from .io.preprocess import Preprocessing

    mean_values, std_values = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    if preset is None and mean_values is None and std_values is None:
        return None
    if (mean_values is None) != (std_values is None) and preset is None:
        raise click.UsageError("--mean and --std go together (or use --preset)")
    base = Preprocessing.preset(preset or "none")
    mean_values, std_values = mean_values or base.mean, std_values or base.std
    if len(mean_values) != len(std_values) or any(v <= 0 for v in std_values):
        raise click.UsageError("--mean and --std need the same number of values, and every std must be > 0")
    return Preprocessing(mean_values, std_values, input_size)


def load_model_from_options(model_path, arch, num_classes, trust_code, preset, mean, std, input_size):
    """The one place the CLI turns model options into ``bdsan.load_model``."""
    import dataclasses

    from .io.models import load_model

    preprocessing = preprocessing_from_options(preset, mean, std, input_size)
    model = load_model(model_path, arch=arch, num_classes=num_classes, preprocessing=preprocessing,
                       trust_code=trust_code)
    if input_size is not None and model.preprocessing.input_size != input_size:
        model.preprocessing = dataclasses.replace(model.preprocessing, input_size=input_size)
    return model


def load_holdout_from_options(holdout, data_split, classes, device, input_size=None, model=None):
    """``bdsan.load_holdout``; with ``model``, also refuse a holdout that does not fit it (classes, size)."""
    from .io.data import check_holdout_matches, load_holdout

    class_names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    data = load_holdout(holdout, device=device, split=data_split, classes=class_names, input_size=input_size)
    return check_holdout_matches(model, data) if model is not None else data


def echo_failed_gates(report: Report) -> None:
    """One stderr line per failed gate (sanitize, trap-train)."""
    for gate in report.gates:
        if not gate["passed"]:
            click.echo(f"gate {gate['name']} failed: {gate['value']} (limit {gate['limit']})", err=True)


def check_report_path(report_path: str) -> None:
    """Refuse an unwritable ``-o`` before any work is done (exit 3, nothing written)."""
    from .atomic import check_writable_dir
    from .errors import OutputError

    target = Path(report_path)
    if target.is_dir():
        raise OutputError(f"-o {report_path} is a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"-o {report_path} is not writable")
    check_writable_dir(target.parent.resolve())


_REPORT_STREAM = None  # the real stdout while a --format json command runs

SCAN_PRECISIONS = ("auto", "bf16", "fp32")  # bdsan.device.PRECISIONS, spelled out so --help never imports torch
# the scan's default kinds, written out so that --help needs no torch import (a test checks it against the scan's)
SCAN_KINDS_DEFAULT = "patch,blend,wave,noise,mix"
SCAN_KINDS_HELP = ("Trigger kinds to look for: patch (mask + pattern) and blend (full-image additive) are "
                   "reverse-engineered; wave searches grey plane waves, SIG's family (about 40 s more on a CPU); "
                   "noise flags a class that fresh grey or colour noise blended at 0.2 sends ≥ 70% of images "
                   "to (a noise-blend backdoor; a few seconds); mix reverse-engineers a full-image "
                   "blend toward an optimised picture, one weight per class (an image-blend backdoor).")
SCAN_PRECISION_HELP = ("Arithmetic of the scan's passes: auto = bf16 on CUDA and on CPUs with native bf16 "
                       "(AVX512-BF16/AMX; about 2x faster there), fp32 elsewhere.")


def emit(report: Report, output_format: str, report_path: str | None, renderers: dict | None = None,
         text_renderer=None) -> int:
    """Print the report (text or JSON), write ``-o`` atomically, and return the report's exit code."""
    renderers = {".json": render_json, **(renderers or {})}
    if report_path:
        suffix = Path(report_path).suffix.lower()
        render = renderers.get(suffix, render_json)
        write_text_atomic(report_path, render(report))
    click.echo(render_json(report) if output_format == "json" else (text_renderer or render_text)(report), nl=False,
               file=_REPORT_STREAM)
    return report.exit_code


@click.group(cls=BdsanGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bdsan")
def cli():
    """bdsan — find and remove backdoors in image classifiers.

    \b
    Typical use:
      bdsan demo                                   offline tour on generated data
      bdsan inspect model.safetensors              what is this file? is it safe to load?
      bdsan audit MODEL --holdout DIR              CA / ASR / RA, exit 1 when a trigger fires
      bdsan sanitize MODEL --holdout DIR --method fmp --out OUT
      bdsan scan MODEL --holdout DIR               reverse-engineer unknown triggers
      bdsan trap-train --data SUSPECT --holdout DIR --arch A --out OUT   train on data you do not trust

    Exit codes: 0 ok, 1 gate failed, 2 usage error, 3 input refused or invalid, 4 run failed, 130 interrupted.
    """


@cli.command("archs")
@common_options
def archs_command(device, seed, batch_size, output_format, report_path, quiet, debug):
    """List the architecture registry (plus user factories: --arch file.py:build)."""
    from .io.archs import list_archs

    report = Report("archs", seed=seed)
    report.details["archs"] = list_archs()
    if output_format == "json" or report_path:
        return emit(report, output_format, report_path)
    for name, description in report.details["archs"].items():
        click.echo(f"{name:32s} {description}")
    return 0


def _parse_names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("expected comma-separated names", param_hint=option)
    return names


def _parse_scan_kinds(text: str, option: str) -> tuple[str, ...]:
    """The scan kinds named in ``text``, checked before any work starts (a usage error otherwise)."""
    from .detectors.scan import KINDS, unknown_kinds

    kinds = tuple(_parse_names(text, option) or ())
    unknown = unknown_kinds(kinds)
    if unknown:
        raise click.BadParameter(f"unknown kind {', '.join(unknown)}; choose from {', '.join(KINDS)}",
                                 param_hint=option)
    return kinds


@cli.command("audit")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@model_options
@holdout_options
@click.option("--max-asr", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Gate: exit 1 when any trigger's attack success rate is above this.")
@click.option("--target", type=click.IntRange(0), default=None,
              help="Known target class: ASR is measured toward it only (default: every class, the max counts).")
@click.option("--triggers", "trigger_names", default=None,
              help="Comma-separated suite triggers to run (default: the whole suite; `bdsan triggers` lists it).")
@click.option("--trigger-image", type=click.Path(dir_okay=False), default=None,
              help="Also test your own trigger: a PNG resized (nearest) to the images; pixels > 0 are pasted.")
@click.option("--trigger-mask", type=click.Path(dir_okay=False), default=None,
              help="PNG mask for --trigger-image: paste (or blend) only where the mask is > 0.")
@click.option("--trigger-alpha", type=click.FloatRange(0, 1), default=None,
              help="Blend --trigger-image with this opacity instead of pasting it.")
@click.option("--sweep", "run_sweep", is_flag=True,
              help="Also sweep trigger variants (patch position/size/content, blend alpha, SIG frequency) and gate on "
                   "each family's strongest; several hundred extra passes over --sweep-images images.")
@click.option("--sweep-images", type=click.IntRange(1), default=256, show_default=True,
              help="Holdout images (stratified subsample) the sweep uses.")
@click.option("--scan", "run_scan", is_flag=True,
              help="Also reverse-engineer unknown triggers (`bdsan scan`); the gate fails on an anomalous class too.")
@click.option("--scan-steps", type=click.IntRange(1), default=200, show_default=True, help="Scan optimisation steps.")
@click.option("--scan-kinds", default=SCAN_KINDS_DEFAULT, show_default=True, help=SCAN_KINDS_HELP)
@click.option("--scan-precision", type=click.Choice(SCAN_PRECISIONS), default="auto", show_default=True,
              help=SCAN_PRECISION_HELP)
@common_options
def audit_command(model_path, arch, num_classes, trust_code, preset, mean, std, input_size, holdout, data_split,
                  classes, max_asr, target, trigger_names, trigger_image, trigger_mask, trigger_alpha, run_sweep,
                  sweep_images, run_scan, scan_steps, scan_kinds, scan_precision, device, seed, batch_size, output_format,
                  report_path, quiet, debug):
    """Measure clean accuracy and, per trigger, attack success rate (every target), net ASR and robust accuracy
    on the whole holdout; exit 1 when a trigger is above --max-asr.

    \b
    -o report.json | report.sarif (SARIF 2.1.0, GitHub code scanning) | report.xml (JUnit) picks the format.
    """
    import time

    from .detectors.audit import audit, gate_max_asr
    from .detectors.triggers import DEFAULT_SUITE, user_trigger
    from .device import describe_device, resolve_device
    from .errors import OutputError
    from .report import AUDIT_RENDERERS

    if (trigger_mask or trigger_alpha is not None) and not trigger_image:
        raise click.UsageError("--trigger-mask/--trigger-alpha need --trigger-image")
    scan_kind_names = _parse_scan_kinds(scan_kinds, "--scan-kinds")
    if report_path and any(Path(report_path).resolve() == Path(p).resolve() for p in (model_path, holdout)):
        raise OutputError(f"-o {report_path} is an input; inputs are never overwritten")
    torch_device = resolve_device(device)
    report = Report("audit", seed=seed, device=describe_device(torch_device))
    started = time.perf_counter()
    triggers: list = list(_parse_names(trigger_names, "--triggers") or ([] if trigger_image else DEFAULT_SUITE))
    if trigger_image:
        triggers.append(user_trigger(trigger_image, trigger_mask, trigger_alpha))
    model = load_model_from_options(model_path, arch, num_classes, trust_code, preset, mean, std, input_size)
    report.model = model.info()
    data = load_holdout_from_options(holdout, data_split, classes, torch_device, input_size, model=model)
    report.holdout = {"path": str(holdout), "n": len(data), "verify": len(data), "classes": list(data.classes)}
    report.timings_s["load"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    report.audit_before = audit(model, data, triggers=triggers, target=target, batch_size=batch_size,
                                device=torch_device, run_sweep=run_sweep, sweep_images=sweep_images)
    report.timings_s["audit"] = round(time.perf_counter() - started, 3)
    passed, failing, highest = gate_max_asr(report.audit_before, max_asr)
    report.add_gate("max_asr", max_asr, highest, passed, failing=failing)
    if not passed:
        report.exit_code = 1
        click.echo(f"gate max_asr failed: {', '.join(failing)} above {max_asr:g}", err=True)
    if run_scan:
        from .detectors.scan import scan, scan_section

        result = scan(model, data, steps=scan_steps, batch_size=batch_size, device=torch_device, seed=seed,
                      kinds=scan_kind_names, precision=scan_precision)
        report.scan = scan_section(result)
        report.timings_s["scan"] = result["time_s"]
        _add_scan_gate(report)
    return emit(report, output_format, report_path, AUDIT_RENDERERS)


@cli.command("scan")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@model_options
@holdout_options
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True,
              help="Optimisation steps (early stopping usually ends sooner).")
@click.option("--kinds", default=SCAN_KINDS_DEFAULT, show_default=True, help=SCAN_KINDS_HELP)
@click.option("--precision", type=click.Choice(SCAN_PRECISIONS), default="auto", show_default=True,
              help=SCAN_PRECISION_HELP)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write PNGs of every reconstructed trigger and of it stamped on sample images (new directory).")
@click.option("--force", is_flag=True, help="Replace an existing --out-dir.")
@common_options
def scan_command(model_path, arch, num_classes, trust_code, preset, mean, std, input_size, holdout, data_split,
                 classes, steps, kinds, precision, out_dir, force, device, seed, batch_size, output_format,
                 report_path, quiet, debug):
    """Reverse-engineer a trigger per class (no trigger knowledge needed) and flag a class whose trigger is
    anomalously small, or that a grey plane wave (SIG's family) sends ≥ 90% of images to (unless the class answers
    every fine texture, or takes images from the wave's pixels shuffled too); exit 1 when one is.

    \b
    -o report.json | report.sarif | report.xml (JUnit) picks the format.
    """
    import time

    from .detectors.scan import scan, scan_section, write_scan_images
    from .device import describe_device, resolve_device
    from .report import AUDIT_RENDERERS

    kind_names = _parse_scan_kinds(kinds, "--kinds")
    if out_dir and Path(out_dir).exists() and not force:
        raise click.UsageError(f"--out-dir {out_dir} already exists (use --force to replace it)")
    torch_device = resolve_device(device)
    report = Report("scan", seed=seed, device=describe_device(torch_device))
    started = time.perf_counter()
    model = load_model_from_options(model_path, arch, num_classes, trust_code, preset, mean, std, input_size)
    report.model = model.info()
    data = load_holdout_from_options(holdout, data_split, classes, torch_device, input_size, model=model)
    report.holdout = {"path": str(holdout), "n": len(data), "classes": list(data.classes)}
    report.timings_s["load"] = round(time.perf_counter() - started, 3)
    result = scan(model, data, steps=steps, batch_size=batch_size, device=torch_device, seed=seed, kinds=kind_names,
                  precision=precision)
    report.scan = scan_section(result)
    report.timings_s["scan"] = result["time_s"]
    if out_dir:
        for path in write_scan_images(result, out_dir, force=force):
            report.artifacts.append({"path": str(path), "bytes": path.stat().st_size})
    _add_scan_gate(report)
    return emit(report, output_format, report_path, AUDIT_RENDERERS)


def _add_scan_gate(report: Report) -> None:
    """Gate ``scan``: fails (exit 1) when the scan flagged an anomalous class. Its value is the number of anomalous
    classes (limit 0): the anomaly index alone does not decide (flip rate, size and the wave kind do too), so it is
    reported beside it as ``max_score``."""
    section = report.scan or {}
    flagged = section.get("anomalous_classes") or []
    index = [v for v in (section.get("score") or []) if v is not None]
    report.add_gate("scan", 0, len(flagged), not flagged, anomalous_classes=flagged,
                    max_score=max(index, default=None))
    if flagged:
        report.exit_code = 1
        click.echo(f"gate scan failed: anomalous class(es) {', '.join(map(str, flagged))} "
                   f"(suspected target {section.get('suspected_target')})", err=True)


@cli.command("triggers")
@click.option("--preview", "preview_dir", type=click.Path(file_okay=False), default=None,
              help="Write one PNG per trigger applied to sample images, plus contact_sheet.png, into this new "
                   "directory.")
@click.option("--holdout", default=None, type=click.Path(), help="Sample images from here (default: generated).")
@click.option("--split", "data_split", type=click.Choice(["train", "test"]), default=None,
              help="For .npz files with x_train/x_test keys.")
@click.option("--classes", default=None, help="Comma-separated class folder names, in label order.")
@click.option("--samples", type=click.IntRange(1, 64), default=8, show_default=True, help="Images per preview.")
@click.option("--force", is_flag=True, help="Replace an existing --preview directory.")
@common_options
def triggers_command(preview_dir, holdout, data_split, classes, samples, force, device, seed, batch_size,
                     output_format, report_path, quiet, debug):
    """List the trigger suite; with --preview, draw every trigger on sample images."""
    from .detectors.preview import write_previews
    from .detectors.triggers import get_trigger, list_triggers

    report = Report("triggers", seed=seed)
    listing = list_triggers()
    report.details["triggers"] = {name: {"description": text, "params": get_trigger(name).params}
                                  for name, text in listing.items()}
    if preview_dir:
        data = load_holdout_from_options(holdout, data_split, classes, "cpu") if holdout else None
        written = write_previews(preview_dir, data, samples=samples, seed=seed, force=force)
        report.artifacts.extend({"path": str(path), "bytes": Path(path).stat().st_size} for path in written)
    if output_format == "json" or report_path:
        return emit(report, output_format, report_path)
    for name, text in listing.items():
        click.echo(f"{name:18s} {text}")
    if preview_dir:
        click.echo(f"wrote {len(report.artifacts)} PNGs to {preview_dir} (contact sheet: "
                   f"{Path(preview_dir) / 'contact_sheet.png'})")
    return 0


@cli.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="FILE.onnx or FILE.safetensors (format from the suffix); written atomically, only when verified.")
@model_options
@click.option("--holdout", default=None, type=click.Path(),
              help="Clean images for the parity check (default: 64 seeded random images).")
@click.option("--split", "data_split", type=click.Choice(["train", "test"]), default=None,
              help="For .npz files with x_train/x_test keys.")
@click.option("--classes", default=None, help="Comma-separated class folder names, in label order.")
@click.option("--bake-preprocessing", is_flag=True,
              help="ONNX: put (x - mean) / std into the graph, so it takes [0,1] pixels.")
@click.option("--atol", type=click.FloatRange(0), default=1e-3, show_default=True,
              help="Max |Δlogit| per image, divided by max(1, the image's largest |logit|).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.999, show_default=True,
              help="Min fraction of images whose argmax matches PyTorch's.")
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset.")
@click.option("--slim", is_flag=True, help="ONNX: physically remove dead (all-zero) channels first.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@common_options
def export_command(model_path, out, arch, num_classes, trust_code, preset, mean, std, input_size, holdout,
                   data_split, classes, bake_preprocessing, atol, min_agreement, opset, slim, force,
                   device, seed, batch_size, output_format, report_path, quiet, debug):
    """Verified export to ONNX or safetensors; exit 1 when parity fails (and no file is left)."""
    import time

    from .device import describe_device, resolve_device
    from .errors import GateFailed, OutputError
    from .exporters import export_format, export_model

    export_format(out)
    if Path(out).exists() and not force:
        raise OutputError(f"--out {out} already exists", hint="use --force to replace it")
    if Path(out).exists() and Path(out).resolve() == Path(model_path).resolve():
        raise OutputError(f"--out {out} is the input model; inputs are never overwritten")
    torch_device = resolve_device(device)
    report = Report("export", seed=seed, device=describe_device(torch_device))
    start = time.perf_counter()
    model = load_model_from_options(model_path, arch, num_classes, trust_code, preset, mean, std, input_size)
    report.model = model.info()
    data = None
    if holdout:
        data = load_holdout_from_options(holdout, data_split, classes, "cpu", input_size, model=model)
    if data is not None:
        report.holdout = {"path": str(holdout), "n": len(data), "classes": list(data.classes)}
    report.timings_s["load"] = round(time.perf_counter() - start, 3)
    try:
        artifact = export_model(model, out, holdout=data, bake_preprocessing=bake_preprocessing, atol=atol,
                                min_agreement=min_agreement, slim=slim, opset=opset, input_size=input_size,
                                device=torch_device, batch_size=batch_size, seed=seed)
    except GateFailed as exc:  # parity failed: the report still carries the numbers; no file was written
        parity = getattr(exc, "details", {}).get("parity")
        if parity is None:
            raise
        click.echo(f"error: {exc.message}", err=True)
        artifact = {"parity": parity, "written": False, "mismatches": exc.details.get("mismatches", [])}
        report.exit_code = exc.exit_code
    parity = artifact["parity"]
    report.add_gate("export_parity_max_scaled_diff", atol, parity["max_scaled_diff"], parity["max_scaled_diff"] <= atol)
    report.add_gate("export_parity_agreement", min_agreement, parity["agreement"], parity["agreement"] >= min_agreement)
    if artifact.get("mismatches"):
        report.add_gate("export_reload_metadata", 0, len(artifact["mismatches"]), False,
                        mismatches=artifact["mismatches"])
    if report.exit_code:
        report.details["export"] = artifact
        return emit(report, output_format, report_path)
    report.timings_s.update(artifact.pop("timings_s", {}))
    artifact.pop("metadata", None)
    report.artifacts.append({k: artifact[k] for k in ("path", "sha256", "bytes", "format")})
    report.details["export"] = artifact
    return emit(report, output_format, report_path)


@cli.command("sanitize")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@model_options
@holdout_options
@click.option("--method", default="fmp", show_default=True, help="Defense to run (`--list-methods` shows them).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New directory for model.onnx, model.safetensors and report.json (refused if it exists, unless "
                   "--force).")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Method hyper-parameter, repeatable (e.g. --param prune_ratio=1/32); the report lists all.")
@click.option("--max-asr", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Gate: exit 1 when any trigger's ASR on the exported model is above this.")
@click.option("--max-acc-drop", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Gate and guard, in points: a larger clean-accuracy drop on verify rolls the defense back "
                   "(exit 1).")
@click.option("--fit-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Share of the holdout the defense may use; the rest only verifies.")
@click.option("--target", type=click.IntRange(0), default=None, help="Known target class for the audits.")
@click.option("--triggers", "trigger_names", default=None,
              help="Comma-separated suite triggers for the audits (default: the whole suite).")
@click.option("--hard-prune/--regrow", "hard_prune", default=None,
              help="Pruning methods: keep pruned channels at zero and export them removed (default), or let "
                   "fine-tuning regrow them as the paper does.")
@click.option("--slim/--no-slim", default=None,
              help="Export hard-pruned channels physically removed (default: when the method hard-pruned).")
@click.option("--flip", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="May the defense's augmentation flip images left-right? auto: only when the input model is as "
                   "accurate on flipped fit images as on the originals (no for signs that come in mirror pairs, "
                   "keep left / keep right).")
@click.option("--bake-preprocessing", is_flag=True, help="ONNX: put (x - mean) / std into the graph.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory (after success only).")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False, callback=lambda ctx, _, value:
              _list_methods(ctx) if value else None, help="List the defenses and their parameters, then exit.")
@common_options
def sanitize_command(model_path, arch, num_classes, trust_code, preset, mean, std, input_size, holdout, data_split,
                     classes, method, out_dir, param_pairs, max_asr, max_acc_drop, fit_fraction, target,
                     trigger_names, hard_prune, slim, flip, bake_preprocessing, force,
                     device, seed, batch_size, output_format, report_path, quiet, debug):
    """Audit → defend (fit split) → audit (verify split) → export ONNX + safetensors → audit the export; exit 1
    when a gate fails (ASR above --max-asr on the exported file, or clean accuracy down more than
    --max-acc-drop points, which also rolls the defense back)."""
    import time

    from .device import resolve_device
    from .report import render_sanitize_text
    from .sanitize.pipeline import check_output
    from .sanitize.registry import method_fields, parse_params

    params = parse_params(param_pairs)
    if hard_prune is not None:
        if "hard_prune" not in method_fields(method):
            raise click.UsageError(f"--hard-prune/--regrow: method {method!r} does not prune")
        params.setdefault("hard_prune", hard_prune)
    if report_path:
        check_report_path(report_path)
    check_output(Path(out_dir), force)
    torch_device = resolve_device(device)
    started = time.perf_counter()
    model = load_model_from_options(model_path, arch, num_classes, trust_code, preset, mean, std, input_size)
    data = load_holdout_from_options(holdout, data_split, classes, torch_device, input_size, model=model)
    load_seconds = time.perf_counter() - started
    from .sanitize.pipeline import sanitize

    report = sanitize(model, data, method, params, out_dir, max_asr=max_asr, max_acc_drop=max_acc_drop, seed=seed,
                      device=torch_device, force=force, fit_fraction=fit_fraction, batch_size=batch_size,
                      triggers=_parse_names(trigger_names, "--triggers"), target=target, slim=slim,
                      bake_preprocessing=bake_preprocessing, timings={"load": load_seconds}, flip=flip)
    echo_failed_gates(report)
    return emit(report, output_format, report_path, text_renderer=render_sanitize_text)


@cli.command("trap-train")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Suspect training data (possibly poisoned): ImageFolder dir or .npz. Keep the holdout out of it.")
@click.option("--data-split", "suspect_split", type=click.Choice(["train", "test"]), default=None,
              help="For a --data .npz with x_train/x_test keys.")
@holdout_options
@click.option("--arch", required=True, help="Architecture to train (`bdsan archs`), file.py:factory or "
              "pkg.module:factory.")
@click.option("--num-classes", type=click.IntRange(1), default=None, help="Default: the suspect data's classes.")
@click.option("--preset", type=click.Choice(["cifar10", "imagenet", "none"]), default=None,
              help="Normalisation (default: the suspect data's own per-channel mean and std).")
@click.option("--mean", default=None, help="Per-channel mean, e.g. 0.4914,0.4822,0.4465.")
@click.option("--std", default=None, help="Per-channel std, e.g. 0.2470,0.2435,0.2616.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New directory for model.onnx, model.safetensors and report.json (refused if it exists, unless "
                   "--force).")
@click.option("--epochs", type=click.IntRange(1), default=200, show_default=True,
              help="Stage-1 (trap) epochs over the suspect data; the paper's CIFAR/GTSRB recipe.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
              help="adam: cosine annealing (the paper's); sgd: nesterov one-cycle (use --lr about 0.1-0.2).")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Stage-1 augmentation: random crops and horizontal flips, or crops alone (--no-flip) for classes "
                   "that come in mirror pairs, as traffic signs (keep left / keep right); BackdoorBench flips "
                   "CIFAR-10, not GTSRB. The replace stage asks the trapped model (sanitize --flip auto).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Stage-1 learning rate.")
@click.option("--train-batch-size", type=click.IntRange(2), default=256, show_default=True,
              help="Stage-1 training batch.")
@click.option("--recon-weight", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Weight of the decoder's reconstruction MSE (the trap's bait).")
@click.option("--tv-weight", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Weight of the reconstruction's total variation.")
@click.option("--stem-end", default="auto", show_default=True,
              help="Last module of the stem (auto: the head is the last residual block + classifier).")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Replace-stage (trap-replace) hyper-parameter, repeatable (e.g. --param epochs=50).")
@click.option("--max-asr", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Gate: exit 1 when any trigger's ASR on the exported model is above this.")
@click.option("--max-acc-drop", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Gate and guard, in points, against the trapped model: a larger drop rolls the replace back.")
@click.option("--fit-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Share of the holdout the replace stage trains on; the rest only verifies.")
@click.option("--target", type=click.IntRange(0), default=None, help="Known target class for the audits.")
@click.option("--triggers", "trigger_names", default=None,
              help="Comma-separated suite triggers for the audits (default: the whole suite).")
@click.option("--bake-preprocessing", is_flag=True, help="ONNX: put (x - mean) / std into the graph.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where stage 1 checkpoints every epoch (default: OUT.checkpoint beside --out); removed after "
                   "success.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory (after success only) and start "
              "over from scratch when a checkpoint exists without --resume.")
@common_options
def trap_train_command(data_path, suspect_split, holdout, data_split, classes, arch, num_classes, preset, mean, std,
                       out_dir, epochs, optimizer, flip, lr, train_batch_size, recon_weight, tv_weight, stem_end,
                       param_pairs, max_asr, max_acc_drop, fit_fraction, target, trigger_names, bake_preprocessing,
                       checkpoint_dir, resume, force, device, seed, batch_size, output_format, report_path, quiet,
                       debug):
    """Train ARCH from scratch on untrusted data with Trap and Replace (ALGORITHMS §2b): stage 1 trains with a
    reconstruction decoder on the stem (CE + 10·MSE + 1·TV), checkpointing every epoch; stage 2 replaces the light
    head on the holdout's fit split, audits before (the trapped model) and after on the verify split, exports ONNX
    + safetensors and audits the export. Exit 1 when a gate fails."""
    from .device import resolve_device
    from .report import render_sanitize_text
    from .sanitize.pipeline import check_output
    from .sanitize.registry import parse_params
    from .sanitize.trap_train import trap_train
    from .train.trap import TrapSettings

    settings = TrapSettings(epochs=epochs, optimizer=optimizer, lr=lr, batch_size=train_batch_size,
                            augment=True if flip else "crop",
                            recon_weight=recon_weight, tv_weight=tv_weight, stem_end=stem_end, seed=seed)
    params = parse_params(param_pairs)
    check_output(Path(out_dir), force)
    torch_device = resolve_device(device)
    preprocessing = preprocessing_from_options(preset, mean, std, None)
    suspect = load_holdout_from_options(data_path, suspect_split, classes, torch_device)
    clean = load_holdout_from_options(holdout, data_split, classes, torch_device)
    report = trap_train(suspect, clean, arch, out_dir, settings=settings, num_classes=num_classes,
                        preprocessing=preprocessing, replace_params=params, checkpoint_dir=checkpoint_dir,
                        resume=resume, force=force, device=torch_device, max_asr=max_asr, max_acc_drop=max_acc_drop,
                        fit_fraction=fit_fraction, batch_size=batch_size,
                        triggers=_parse_names(trigger_names, "--triggers"), target=target,
                        bake_preprocessing=bake_preprocessing)
    echo_failed_gates(report)
    return emit(report, output_format, report_path, text_renderer=render_sanitize_text)


def _list_methods(ctx: click.Context) -> None:
    from .sanitize.registry import get_method, list_methods, method_fields

    for name, description in list_methods().items():
        click.echo(f"{name:16s} {description}")
        resolved = get_method(name)  # defaults as the default recipe resolves them
        for field_name, (_, default) in method_fields(name).items():
            note = "  (depends on recipe)" if default is None else ""
            click.echo(f"    {field_name}={getattr(resolved, field_name, default)!r}{note}")
    ctx.exit(0)


@cli.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@model_options
@click.option("--holdout", default=None, type=click.Path(),
              help="Also check that this holdout (ImageFolder dir or .npz) fits the model: classes, image size.")
@click.option("--split", "data_split", type=click.Choice(["train", "test"]), default=None,
              help="For .npz files with x_train/x_test keys.")
@click.option("--classes", default=None, help="Comma-separated class folder names, in label order.")
@common_options
def inspect_command(model_path, arch, num_classes, trust_code, preset, mean, std, input_size, holdout, data_split,
                    classes, device, seed, batch_size, output_format, report_path, quiet, debug):
    """What is this model file, and is it safe to load? Exit 3 when it is refused.

    \b
    Format (by content), architecture, classes, parameter count, sha256, preprocessing found in the metadata,
    and, for pickles, the globals loading would import (scanned, never executed).
    With --holdout, also loads the holdout and checks it fits the model (exit 3 when it does not).
    """
    import dataclasses

    from .errors import ModelRefused, OutputError
    from .io.models import inspect_model

    if report_path and Path(report_path).resolve() == Path(model_path).resolve():
        raise OutputError(f"-o {report_path} is the model file; inputs are never overwritten")
    preprocessing = preprocessing_from_options(preset, mean, std, input_size)
    info, loaded = inspect_model(model_path, arch=arch, num_classes=num_classes, preprocessing=preprocessing,
                                 trust_code=trust_code)
    if input_size is not None and loaded is not None and loaded.preprocessing.input_size != input_size:
        loaded.preprocessing = dataclasses.replace(loaded.preprocessing, input_size=input_size)
        info["preprocessing"] = loaded.preprocessing.to_dict()
    report = Report("inspect", seed=seed)
    report.model = loaded.info() if loaded is not None else None
    report.details["inspect"] = info
    report.warnings.extend(info["warnings"])
    if holdout and loaded is None and info["safe"]:
        raise ModelRefused(info["problem"] or f"{model_path}: cannot be loaded", hint="--holdout needs a loadable model")
    if holdout and loaded is not None:
        data = load_holdout_from_options(holdout, data_split, classes, "cpu", input_size, model=loaded)
        report.holdout = {"path": str(holdout), "n": len(data), "classes": list(data.classes),
                          "class_counts": data.class_counts(), "image_size": list(data.image_size),
                          "skipped": list(data.skipped)}
        report.warnings.extend(f"skipped unreadable image {s}" for s in data.skipped)
    if not info["safe"] and not info["loaded"]:
        report.exit_code = 3
        click.echo(f"error: {info['problem']}", err=True)
        click.echo("hint: nothing was loaded; rerun with --trust-code only if you trust the file's origin "
                   "(it runs code from the file)", err=True)
    return emit(report, output_format, report_path, text_renderer=render_inspect_text)


def render_inspect_text(report: Report) -> str:
    """``bdsan inspect`` for people."""
    info = report.details["inspect"]
    sources = info.get("sources", {})

    def source(key: str) -> str:
        return f"  ({sources[key]})" if sources.get(key) else ""

    lines = [f"{'file':14s}{info['path']}", f"{'format':14s}{info['format']}"]
    if info["safe"]:
        safety = "safe: tensors and metadata only, no code" if not info["globals"] else \
            "safe: the pickle only rebuilds tensors (loaded with torch.load(weights_only=True))"
    elif info["loaded"]:
        safety = "UNSAFE, loaded with --trust-code: code from the file ran"
    else:
        safety = "REFUSED: loading would run code from the file"
    lines.append(f"{'safety':14s}{safety}")
    if info["unsafe_globals"]:
        lines.append(f"{'imports':14s}{', '.join(info['unsafe_globals'][:12])}"
                     + (f" … (+{len(info['unsafe_globals']) - 12})" if len(info["unsafe_globals"]) > 12 else ""))
    lines += [f"{'sha256':14s}{info['sha256']}", f"{'size':14s}{info['bytes']:,} bytes"]
    if info["safe"] or info["loaded"]:
        lines.append(f"{'architecture':14s}{info['arch'] or 'unknown'}{source('arch')}")
        classes = info["num_classes"] if info["num_classes"] is not None else "unknown"
        names = f" [{', '.join(info['classes'][:10])}{' …' if len(info['classes']) > 10 else ''}]" \
            if info["classes"] else ""
        lines.append(f"{'classes':14s}{classes}{names}{source('num_classes')}")
        if info["params"] is not None:
            lines.append(f"{'parameters':14s}{info['params']:,}")
        prep = info["preprocessing"]
        if prep:
            size = prep["input_size"] or "as given"
            lines.append(f"{'preprocessing':14s}mean {', '.join(f'{v:g}' for v in prep['mean'])}; "
                         f"std {', '.join(f'{v:g}' for v in prep['std'])}; input size {size}{source('preprocessing')}")
        for key, value in info["metadata"].items():
            shown = value if len(value) <= 80 else value[:77] + "..."
            lines.append(f"{'metadata':14s}{key} = {shown}")
    if info["loaded"]:
        lines.append(f"{'status':14s}loads OK")
    elif info["problem"]:
        lines.append(f"{'status':14s}{info['problem']}")
    if report.holdout:
        h = report.holdout
        lines.append(f"{'holdout':14s}{h['path']}: {h['n']} images, {h['image_size'][0]}×{h['image_size'][1]}, "
                     f"{len(h['classes'])} classes (per class: {', '.join(map(str, h['class_counts']))}) — fits the model")
        lines += [f"warning: skipped unreadable image {s}" for s in h["skipped"]]
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines) + "\n"


@cli.command("demo")
@click.option("--out", "out_dir", default="bdsan-demo", show_default=True, type=click.Path(file_okay=False),
              help="New directory for the tour's files (refused if it exists, unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--max-asr", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Gate: highest acceptable attack success rate.")
@common_options
def demo_command(out_dir, force, max_asr, device, seed, batch_size, output_format, report_path, quiet, debug):
    """Offline tour on generated data: train a tiny backdoored model, audit it (fails), sanitize it, audit again
    (passes), export ONNX, and draw the trigger and the ASR before/after."""
    from .demo import render_demo_text, run_demo

    if report_path:
        check_report_path(report_path)
    echo = click.echo if output_format == "text" else (lambda line: None)
    result = run_demo(out_dir, force=force, seed=seed, device=device, max_asr=max_asr, echo=echo)
    return emit(result.report, output_format, report_path, text_renderer=lambda report: render_demo_text(result))


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("BDSAN_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and maps every outcome to SPEC §3.1 exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    keep_freed_memory()
    try:
        default_map = None
        config_path = find_config_arg(argv)
        if config_path:
            default_map = default_map_for(cli, load_config_file(config_path), f"--config {config_path}")
        code = cli.main(args=argv, prog_name="bdsan", standalone_mode=False, default_map=default_map)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo("interrupted; partial outputs removed", err=True)
        code = EXIT_INTERRUPTED
    except BdsanError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        code = exc.exit_code
    except MemoryError:
        click.echo("error: out of memory", err=True)
        code = EXIT_RUN
    except Exception as exc:  # noqa: BLE001 -- the last line of defence: no traceback unless --debug
        if debug:
            traceback.print_exc()
        oom = "out of memory" in str(exc).lower()
        click.echo(f"error: {'out of memory: ' if oom else 'internal error: '}{type(exc).__name__}: {exc}", err=True)
        click.echo("hint: rerun with --debug for the traceback" + ("; try a smaller --batch-size" if oom else ""),
                   err=True)
        code = EXIT_RUN
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
