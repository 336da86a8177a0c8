"""bdsan trap-train (ALGORITHMS §2b): the decoder, the trap loss, checkpoint/resume, and trap + replace end to end."""
from __future__ import annotations

import pytest
import torch

from bdsan.errors import OutputError, UsageError
from bdsan.io.archs import build_arch
from bdsan.io.data import Holdout
from bdsan.io.models import from_module, load_model
from bdsan.sanitize.trap_train import default_checkpoint_dir, trap_train
from bdsan.train.fixtures import TOY_PREPROCESSING, corner_square
from bdsan.train.poison import poison_arrays
from bdsan.train.synthetic import make_synthetic
from bdsan.train.trap import TrapSettings, build_decoder, total_variation, train_trap


def test_decoder_doubles_the_resolution_per_stage_and_quarters_the_channels():
    decoder = build_decoder(512, (4, 4), (32, 32))  # cifar_resnet18's stem output (§2b: 512→128→32→3)
    convs = [m for m in decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(512, 128), (128, 32), (32, 3)]
    out = decoder(torch.randn(2, 512, 4, 4))
    assert out.shape == (2, 3, 32, 32) and 0 < out.min() and out.max() < 1
    assert build_decoder(64, (32, 32), (32, 32))(torch.randn(1, 64, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(UsageError, match="power of two"):
        build_decoder(64, (6, 6), (32, 32))


def test_total_variation_counts_squared_neighbour_differences():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # one bright pixel: one vertical and one horizontal difference of 1
    assert total_variation(x).item() == pytest.approx(2 / 4)
    assert total_variation(torch.ones(2, 3, 8, 8)).item() == 0


def _toy_suspect(n: int = 1000, seed: int = 0) -> Holdout:
    x, y = make_synthetic(n, 5, 32, seed=seed)
    x, y, _ = poison_arrays(x, y, corner_square, 0.1, 0, seed=seed)
    return Holdout(x, y, [f"class{i}" for i in range(5)], "suspect")


def _network(seed: int = 0):
    torch.manual_seed(seed)
    return from_module(build_arch("tiny_cnn", 5), "tiny_cnn", 5, TOY_PREPROCESSING).normalized()


SMALL = TrapSettings(epochs=3, optimizer="sgd", lr=0.05, batch_size=64, augment=True)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    suspect = _toy_suspect(256)
    reference = _network()
    full = train_trap(reference, suspect.x, suspect.y, SMALL)
    assert [e["epoch"] for e in full.log] == [1, 2, 3] and full.log[-1]["recon_mse"] < full.log[0]["recon_mse"]

    checkpoint = tmp_path / "trap.pt"

    def interrupt(step, total, stats):
        if stats["epoch"] == 2 and step % 4 == 2:  # mid-way through epoch 2: epoch 1's checkpoint is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_trap(_network(), suspect.x, suspect.y, SMALL, checkpoint=checkpoint, progress=interrupt)
    with pytest.raises(OutputError, match="checkpoint exists"):
        train_trap(_network(), suspect.x, suspect.y, SMALL, checkpoint=checkpoint)
    with pytest.raises(UsageError, match="other data"):
        train_trap(_network(), suspect.x, suspect.y, TrapSettings(**{**vars(SMALL), "lr": 0.01}),
                   checkpoint=checkpoint, resume=True)
    resumed_network = _network(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = train_trap(resumed_network, suspect.x, suspect.y, SMALL, checkpoint=checkpoint, resume=True)
    assert resumed.resumed_from == 1 and [e["epoch"] for e in resumed.log] == [1, 2, 3]
    for key, value in reference.state_dict().items():
        assert torch.allclose(resumed_network.state_dict()[key], value, atol=1e-6), key
    assert resumed.log[-1]["loss"] == pytest.approx(full.log[-1]["loss"], rel=1e-5)


def test_trap_then_replace_removes_the_toy_backdoor(tmp_path):
    suspect = _toy_suspect()
    hx, hy = make_synthetic(400, 5, 32, seed=1000)
    holdout = Holdout(hx, hy, list(suspect.classes), "holdout")
    out = tmp_path / "out"
    settings = TrapSettings(epochs=6, optimizer="sgd", lr=0.1, batch_size=64, augment=False)
    report = trap_train(suspect, holdout, "tiny_cnn", out, settings=settings, replace_params={"epochs": 20},
                        triggers=["badnets_square"])
    assert report.command == "trap-train" and report.exit_code == 0
    trap = report.details["trap"]
    assert len(trap["epochs"]) == 6 and trap["decoder_reads"].endswith("11")  # tiny_cnn's head: the last conv on
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "report.json",
                                                      "trapped.safetensors"]
    stage1 = load_model(out / "trapped.safetensors")  # the trapped model, kept: the only copy of stage 1
    for key, value in report.trained.module.state_dict().items():
        assert torch.equal(stage1.module.state_dict()[key], value), key
    assert not default_checkpoint_dir(out).exists()
    others = holdout.y != 0
    x = holdout.x[others].float().div(255)
    with torch.no_grad():
        trapped = report.trained.normalized().eval()
        assert (trapped(corner_square(x)).argmax(1) == 0).float().mean() >= 0.8  # the trap stage learnt the backdoor
        replaced = report.defended.normalized().eval()
        assert (replaced(corner_square(x)).argmax(1) == 0).float().mean() <= 0.2  # the new head has not
        assert (replaced(holdout.x.float().div(255)).argmax(1) == holdout.y).float().mean() >= 0.9


def test_a_corrupt_checkpoint_is_refused_not_unpickled(tmp_path):
    suspect = _toy_suspect(64)
    checkpoint = tmp_path / "trap.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(OutputError, match="cannot read"):
        train_trap(_network(), suspect.x, suspect.y, SMALL, checkpoint=checkpoint, resume=True)


def test_stem_ce_scale_zero_keeps_the_classification_loss_out_of_the_stem():
    suspect = _toy_suspect(128)
    network = _network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    settings = TrapSettings(epochs=1, optimizer="sgd", lr=0.05, batch_size=64, weight_decay=0.0, recon_weight=0.0,
                            tv_weight=0.0, stem_ce_scale=0.0, augment=False)
    result = train_trap(network, suspect.x, suspect.y, settings)
    head = {name for name, _ in result.split.head}
    for key, value in network.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(("weight", "bias")):  # parameters: only the head's moved (BN statistics move everywhere)
            assert torch.equal(value, before[key]) == (module not in head), key
