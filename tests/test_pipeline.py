"""The sanitize pipeline (SPEC §1, §3.3, §5): FMP on the toy backdoor, the guard's rollback, atomic outputs."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from bdsan.errors import OutputError
from bdsan.io.models import sha256_file
from bdsan.sanitize import DefenseResult, register_method
from bdsan.sanitize.pipeline import sanitize

TRIGGERS = ["badnets_square", "blend_noise"]  # the first matches the toy's 3×3 corner trigger
FAST_FMP = {"rank_images": 10, "epochs": 6, "reference_images": 0, "batch_size": 64}


@register_method("test-wreck", "test only: destroys the network")
@dataclass
class Wreck:
    """Test only: scrambles every weight, so clean accuracy collapses."""

    scale: float = 5.0

    def run(self, model, fit, ctx):
        generator = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * self.scale)
        return DefenseResult(model, {"scrambled": True})


@pytest.fixture(scope="module")
def fmp_run(toy_poisoned, tmp_path_factory):
    out = tmp_path_factory.mktemp("sanitize") / "out"
    report = sanitize(toy_poisoned.model, toy_poisoned.holdout, "fmp", FAST_FMP, out, triggers=TRIGGERS)
    return report, out


def test_fmp_removes_the_toy_backdoor_and_ships_verified_files(fmp_run, toy_poisoned):
    report, out = fmp_run
    data = report.to_dict()
    assert data["exit_code"] == 0 and report.gates_passed
    assert data["audit_before"]["triggers"][0]["asr_max"] > 0.9  # the backdoor was there
    assert data["audit_export"]["triggers"][0]["asr_max"] <= 0.2  # gone from the ONNX file that ships
    assert data["audit_export"]["onnx_provider"] == "CPUExecutionProvider"
    assert 100 * (data["audit_before"]["ca"] - data["audit_export"]["ca"]) <= 3.0
    gates = {g["name"]: g for g in data["gates"]}
    assert gates["max_asr"]["judged_on"] == "audit_export" and gates["max_acc_drop"]["passed"]
    small = data["holdout"]["verify"] < 1112  # ±100/√n ≥ 3 points (--max-acc-drop): the report warns
    assert small and any("verify split has only" in w for w in data["warnings"])
    assert data["holdout"]["n"] == 400 and data["holdout"]["fit"] + data["holdout"]["verify"] == 400
    assert data["audit_before"]["n"] == data["holdout"]["verify"]
    defense = data["defense"]
    assert defense["method"] == "fmp" and defense["params"]["rank_images"] == 10
    assert defense["params"]["prune_ratio"] == 1 / 64 and defense["guard"]["rolled_back"] is False
    assert [k["name"] for k in defense["fit_audit"]["known_triggers"]] == ["badnets_square"]
    assert defense["details"]["n_pruned"] == 2  # floor(64/64) in the two 64-channel layers
    assert set(data["timings_s"]) >= {"split", "audit_before", "defense", "audit_after", "export", "audit_export"}
    files = sorted(p.name for p in out.iterdir())
    assert files == ["model.onnx", "model.safetensors", "report.json"]
    for artifact in data["artifacts"]:
        assert artifact["sha256"] == sha256_file(out / artifact["path"])
        assert artifact["bytes"] == (out / artifact["path"]).stat().st_size
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema"] == "bdsan.report/1" and on_disk["exit_code"] == 0
    assert on_disk["gates"] == json.loads(json.dumps(data["gates"]))
    assert toy_poisoned.model.module.training is False  # the caller's model is untouched
    assert not list(out.parent.glob(".out.*"))  # no temporary directory left behind


def test_guard_rolls_back_a_destructive_defense(toy_poisoned, tmp_path):
    out = tmp_path / "out"
    before = {k: v.clone() for k, v in toy_poisoned.model.module.state_dict().items()}
    report = sanitize(toy_poisoned.model, toy_poisoned.holdout, "test-wreck", {}, out, triggers=TRIGGERS[:1])
    data = report.to_dict()
    assert data["exit_code"] == 1
    guard = data["defense"]["guard"]
    assert guard["rolled_back"] is True and guard["stage"] == "verify" and guard["drop_points"] > 3
    gates = {g["name"]: g for g in data["gates"]}
    assert gates["max_acc_drop"]["passed"] is False and gates["max_acc_drop"]["rolled_back"] is True
    assert data["audit_export"] is None and data["artifacts"] == []
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # nothing that looks like a fixed model
    assert all(torch.equal(before[k], v) for k, v in toy_poisoned.model.module.state_dict().items())


def test_small_verify_warning_follows_the_drop_gate(toy_poisoned):
    # 200 verify images measure accuracy to about ±7 points: a warning under a 3-point gate, none under a 50-point one
    for limit, warned in ((3.0, True), (50.0, False), (0.0, True)):
        data = sanitize(toy_poisoned.model, toy_poisoned.holdout, "test-wreck", {}, None, triggers=TRIGGERS[:1],
                        max_acc_drop=limit).to_dict()
        assert data["holdout"]["verify"] == 200
        assert warned == any("verify split has only 200 images" in w for w in data["warnings"])


def test_existing_output_is_refused_and_inputs_are_protected(toy_poisoned, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        sanitize(toy_poisoned.model, toy_poisoned.holdout, "fmp", {}, tmp_path / "taken")
    holdout = toy_poisoned.holdout
    holdout_inside = type(holdout)(holdout.x, holdout.y, holdout.classes, str(tmp_path / "taken" / "h.npz"))
    (tmp_path / "taken" / "h.npz").write_bytes(b"")
    with pytest.raises(OutputError, match="inputs are never overwritten"):
        sanitize(toy_poisoned.model, holdout_inside, "fmp", {}, tmp_path / "taken", force=True)
    assert (tmp_path / "taken" / "h.npz").exists()
