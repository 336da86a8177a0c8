"""``bdsan trap-train``: Trap and Replace at training time (ALGORITHMS §2b), for data one does not trust.

Stage 1 trains ``arch`` from scratch on the suspect data with the trap loss (``bdsan.train.trap``), checkpointing
every epoch beside the output directory; stage 2 is the ordinary sanitize pipeline with ``trap-replace`` on the
holdout (fit split: the new head; verify split: audits before and after, guard, export, export audit). The report
is the pipeline's, with ``command: "trap-train"`` and the training stage under ``details.trap``; its
``audit_before`` is the trapped model (the stage-1 network with its original head), which is also written as
``trapped.safetensors`` — not sanitized, but the only copy of the training run when the guard rolls the replace
back.

The holdout should not be part of the suspect data (the paper removes it from stage 1); the suspect data's own
channel statistics become the model's normalisation unless one is given.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import DataError
from ..io.archs import build_arch
from ..io.data import Holdout, check_holdout_matches
from ..io.models import from_module
from ..io.preprocess import Preprocessing
from ..report import Report
from ..train.trap import TrapSettings, train_trap
from ..train.zoo import channel_stats
from .pipeline import check_output, sanitize

log = logging.getLogger("bdsan.sanitize")


TRAPPED_FILE = "trapped.safetensors"  # stage 1's model, kept beside the sanitized one (even after a rollback)


def default_checkpoint_dir(out_dir: str | Path) -> Path:
    """Where stage 1 keeps its per-epoch checkpoint: ``OUT.checkpoint`` beside ``--out``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


def trap_train(suspect: Holdout, holdout: Holdout, arch: str, out_dir: str | Path, *,
               settings: TrapSettings | None = None, num_classes: int | None = None,
               preprocessing: Preprocessing | None = None, replace_params: dict | None = None,
               checkpoint_dir: str | Path | None = None, resume: bool = False, force: bool = False,
               device: str | torch.device | None = None, progress=None, **pipeline_options) -> Report:
    """Train ``arch`` on ``suspect`` with the trap, replace its head on ``holdout``, export into ``out_dir``.

    ``pipeline_options`` go to ``bdsan.sanitize`` (``max_asr``, ``max_acc_drop``, ``fit_fraction``,
    ``batch_size``, ``triggers``, ``target``, ``bake_preprocessing``); ``settings.seed`` seeds both stages. The
    checkpoint directory is removed after success and kept otherwise (``resume`` continues it — a run stopped after
    stage 1 goes straight to the replace stage; ``force`` deletes it and starts over).
    """
    settings = settings or TrapSettings()
    out_dir = Path(out_dir)
    check_output(out_dir, force)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out_dir)
    if force and not resume and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    num_classes = num_classes or len(suspect.classes)
    if len(suspect) == 0 or int(suspect.y.max()) >= num_classes:
        raise DataError(f"suspect data {suspect.path}: no images, or labels beyond its {num_classes} classes",
                        hint="check --data and --num-classes")
    device = resolve_device(device)  # None: CUDA when there is one
    suspect = suspect.to(device)
    preprocessing = preprocessing or channel_stats(suspect.x)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's global RNG
        torch.manual_seed(settings.seed)
        module = build_arch(arch, num_classes)
    model = from_module(module, arch, num_classes, preprocessing, list(suspect.classes))
    model.preprocessing = Preprocessing(preprocessing.mean, preprocessing.std, suspect.image_size[0])
    holdout = check_holdout_matches(model, holdout)
    if holdout.image_size != suspect.image_size:
        raise DataError(f"holdout images are {holdout.image_size} but the suspect data's are {suspect.image_size}")

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    network = model.normalized().to(device)
    checkpoint = checkpoint_dir / "trap.pt"
    try:
        with _progress_bar(progress) as report_progress:
            trapped = train_trap(network, suspect.x, suspect.y, settings, checkpoint=checkpoint, resume=resume,
                                 progress=report_progress)
    except BaseException:
        with contextlib.suppress(OSError):
            checkpoint_dir.rmdir()  # only when empty: a written checkpoint stays for --resume
        if checkpoint.exists():
            log.warning("trap-train stopped; its checkpoint %s is kept: the same command with --resume continues "
                        "it", checkpoint)
        raise
    module.eval()
    details = {"trap": {"settings": dataclasses.asdict(settings), "suspect": {"path": suspect.path, "n": len(suspect)},
                        "checkpoint_dir": str(checkpoint_dir), **trapped.details()}}
    params = {"stem_end": settings.stem_end, **(replace_params or {})}
    report = sanitize(model, holdout, "trap-replace", params, out_dir, device=device, force=force,
                      command="trap-train", details=details, seed=settings.seed,
                      timings={"trap_train": trapped.seconds}, save_input=TRAPPED_FILE, **pipeline_options)
    report.trained = model
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return report


@contextlib.contextmanager
def _progress_bar(progress):
    """The caller's callback, or one tqdm bar showing the epoch, the loss and the reconstruction error."""
    if progress is not None:
        yield progress
        return
    from ..progress import progress_bar

    bar = None

    def update(done: int, total: int, stats: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, "trap-train", unit="step")
        bar.update(done - bar.n)
        if done % 10 == 0 or done == total:
            bar.set_postfix(epoch=stats["epoch"], loss=f"{float(stats['loss']):.3f}",
                            recon=f"{float(stats['recon_mse']):.4f}")

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
