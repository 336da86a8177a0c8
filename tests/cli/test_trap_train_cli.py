"""``bdsan trap-train`` end to end through ``bdsan.cli.main``: outputs, the checkpoint and ``--resume``, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bdsan.io.archs import build_arch
from bdsan.io.models import from_module
from bdsan.train.fixtures import corner_square
from bdsan.train.poison import poison_arrays
from bdsan.train.synthetic import make_synthetic
from bdsan.train.trap import TrapSettings, train_trap
from bdsan.train.zoo import channel_stats

STAGE1 = ["--arch", "tiny_cnn", "--epochs", "3", "--optimizer", "sgd", "--lr", "0.1", "--train-batch-size", "64"]
FAST = ["--param", "epochs=5", "--triggers", "badnets_square", "--quiet"]


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """(path, x, y): 600 generated images, 10% stamped with the corner square and relabelled 0."""
    x, y = make_synthetic(600, 5, 32, seed=3)
    x, y, _ = poison_arrays(x, y, corner_square, 0.1, 0, seed=3)
    path = tmp_path_factory.mktemp("suspect") / "suspect.npz"
    np.savez(path, x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    return path, x, y


@pytest.fixture(scope="module")
def uninterrupted(suspect, holdout_npz, tmp_path_factory):
    """(out dir, report) of one whole run."""
    from cli_helpers import invoke_main

    out = tmp_path_factory.mktemp("whole") / "out"
    result = invoke_main("trap-train", "--data", str(suspect[0]), "--holdout", str(holdout_npz), *STAGE1, "--out",
                         str(out), *FAST, "--format", "json")
    assert result.code == 0, result.output
    return out, result.json


def test_trap_train_writes_the_outputs_and_removes_its_checkpoint(run_cli, suspect, holdout_npz, uninterrupted):
    out, report = uninterrupted
    assert report["command"] == "trap-train" and report["defense"]["method"] == "trap-replace"
    assert [e["epoch"] for e in report["details"]["trap"]["epochs"]] == [1, 2, 3]
    assert report["details"]["trap"]["resumed_from_epoch"] == 0 and "trap_train" in report["timings_s"]
    assert report["details"]["trap"]["settings"]["augment"] is True  # crops and flips unless --no-flip
    assert report["defense"]["augmentation"]["mode"] == "auto"  # the replace stage asks the trapped model
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "report.json",
                                                      "trapped.safetensors"]
    assert [a.get("role") for a in report["artifacts"]] == [None, None, "input (not sanitized)"]
    assert not out.with_name("out.checkpoint").exists()
    again = run_cli("trap-train", "--data", suspect[0], "--holdout", holdout_npz, *STAGE1, "--out", out, *FAST)
    assert again.code == 3 and "already exists" in again.stderr


def test_no_flip_trains_stage_one_on_crops_alone(suspect, holdout_npz, tmp_path):
    from cli_helpers import invoke_main

    stage1 = [a if a != "3" else "1" for a in STAGE1]  # one epoch is enough to read the settings back
    result = invoke_main("trap-train", "--data", str(suspect[0]), "--holdout", str(holdout_npz), *stage1,
                         "--no-flip", "--out", str(tmp_path / "out"), *FAST, "--format", "json")
    assert result.code in (0, 1), result.output
    assert result.json["details"]["trap"]["settings"]["augment"] == "crop"


def test_an_interrupted_run_is_refused_without_resume_and_continued_with_it(run_cli, suspect, holdout_npz,
                                                                             tmp_path, uninterrupted):
    _, x, y = suspect
    preprocessing = channel_stats(x)  # what the command normalises with: the suspect data's own statistics
    torch.manual_seed(0)  # the command's seeded initial weights (--seed 0)
    network = from_module(build_arch("tiny_cnn", 5), "tiny_cnn", 5, preprocessing).normalized()
    checkpoint = tmp_path / "out.checkpoint" / "trap.pt"
    checkpoint.parent.mkdir()

    def interrupt(step, total, stats):
        if stats["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the command's stage 1, stopped in its second epoch
        train_trap(network, x, y, TrapSettings(epochs=3, optimizer="sgd", lr=0.1, batch_size=64), checkpoint=checkpoint,
                   progress=interrupt)
    out = tmp_path / "out"
    refused = run_cli("trap-train", "--data", suspect[0], "--holdout", holdout_npz, *STAGE1, "--out", out, *FAST)
    assert refused.code == 3 and "--resume" in refused.stderr and not out.exists()
    other = run_cli("trap-train", "--data", suspect[0], "--holdout", holdout_npz, *STAGE1, "--out", out, *FAST,
                    "--resume", "--recon-weight", "5")
    assert other.code == 2 and "other data" in other.stderr and checkpoint.exists()
    resumed = run_cli("trap-train", "--data", suspect[0], "--holdout", holdout_npz, *STAGE1, "--out", out, *FAST,
                      "--resume", "--format", "json")
    assert resumed.code == 0, resumed.output
    trap, whole = resumed.json["details"]["trap"], uninterrupted[1]["details"]["trap"]
    assert trap["resumed_from_epoch"] == 1 and [e["epoch"] for e in trap["epochs"]] == [1, 2, 3]
    for mine, theirs in zip(trap["epochs"], whole["epochs"]):  # the same run as one that was never interrupted
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert resumed.json["audit_after"]["ca"] == uninterrupted[1]["audit_after"]["ca"]
    assert not checkpoint.parent.exists()


def test_bad_input_is_one_line_and_exit_3(run_cli, suspect, holdout_npz, tmp_path):
    missing = run_cli("trap-train", "--data", tmp_path / "nope.npz", "--holdout", holdout_npz, *STAGE1, "--out",
                      tmp_path / "out", *FAST)
    assert missing.code == 3 and "Traceback" not in missing.stderr
    three = tmp_path / "three.npz"  # 3 classes: the 5-class holdout does not fit a model trained on it
    x, y = make_synthetic(50, 3, 32, seed=1)
    np.savez(three, x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    mismatch = run_cli("trap-train", "--data", three, "--holdout", holdout_npz, *STAGE1, "--out", tmp_path / "o2",
                       *FAST)
    assert mismatch.code == 3 and "3 classes" in mismatch.stderr and "Traceback" not in mismatch.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.checkpoint").exists()
    bad_stem = run_cli("trap-train", "--data", suspect[0], "--holdout", holdout_npz, *STAGE1, "--out",
                       tmp_path / "o3", "--stem-end", "nowhere", *FAST)
    assert bad_stem.code == 2 and "not a module" in bad_stem.stderr
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.checkpoint").exists()
