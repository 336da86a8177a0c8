"""`bdsan demo`: the offline tour trains, fails the audit, sanitizes, passes, exports and draws, in one command."""
import json

import pytest

pytest.importorskip("bdsan.sanitize.pipeline")


_DEMO: dict = {}


@pytest.fixture
def demo_run(run_cli, tmp_path_factory):
    """One demo run shared by the tests of this module (30 to 90 s on 2 CPU cores)."""
    if "run" not in _DEMO:
        out = tmp_path_factory.mktemp("demo") / "bdsan-demo"
        _DEMO["run"] = (out, run_cli("demo", "--out", str(out), "--device", "cpu"))
    return _DEMO["run"]


def test_demo_removes_the_backdoor_and_says_how(demo_run):
    out, result = demo_run
    assert result.code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    gate = 0.2
    before = max(t["asr_max"] for t in report["audit_before"]["triggers"])
    after = max(t["asr_max"] for t in report["audit_after"]["triggers"])
    exported = max(t["asr_max"] for t in report["audit_export"]["triggers"])
    assert before > 0.9
    assert after < gate and exported < gate
    assert report["exit_code"] == 0 and report["details"]["result"].startswith("sanitized with ")
    method = report["defense"]["method"]
    assert f"Removed by `{method}`" in result.output
    assert "FAIL" in result.output and "PASS" in result.output


def test_demo_writes_its_pictures_models_and_data(demo_run):
    out, result = demo_run
    method = json.loads((out / "report.json").read_text())["defense"]["method"]
    for name in ["asr.png", "triggers/badnets_grid.png", "triggers/contact_sheet.png"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert (out / "backdoored.safetensors").is_file() and (out / "data" / "holdout.npz").is_file()
    assert list((out / f"sanitized-{method}").glob("*.onnx"))
    assert str(out / "asr.png") in result.output and str(out / "report.json") in result.output


def test_demo_refuses_an_existing_directory(demo_run, run_cli):
    out, _ = demo_run
    before = sorted(p.name for p in out.iterdir())
    result = run_cli("demo", "--out", str(out))
    assert result.code == 3 and "already exists" in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before
