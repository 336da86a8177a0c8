"""Option precedence (SPEC §3.2): command line > BDSAN_* environment > --config file > defaults."""
from __future__ import annotations

import json

import pytest
from cli_helpers import invoke_main as run


def seed_of(result) -> int:
    assert result.code == 0, result.output
    return result.json["seed"]


@pytest.fixture
def toml_config(tmp_path):
    path = tmp_path / "bdsan.toml"
    path.write_text('seed = 1\nformat = "json"\n')
    return path


def test_default(tmp_path):
    assert seed_of(run("archs", "--format", "json")) == 0


def test_config_beats_default(toml_config):
    assert seed_of(run("archs", "--config", toml_config)) == 1  # format = "json" from the file too


def test_env_beats_config(toml_config):
    assert seed_of(run("archs", "--config", toml_config, env={"BDSAN_SEED": "2"})) == 2


def test_command_line_beats_env_and_config(toml_config):
    assert seed_of(run("archs", "--config", toml_config, "--seed", "3", env={"BDSAN_SEED": "2"})) == 3


def test_env_names_follow_the_long_option(tmp_path):
    result = run("archs", env={"BDSAN_FORMAT": "json", "BDSAN_REPORT": str(tmp_path / "r.json")})
    assert result.json["command"] == "archs"
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "archs"


def test_config_from_env_and_yaml_with_command_tables(tmp_path):
    path = tmp_path / "bdsan.yaml"
    path.write_text("seed: 4\nformat: json\narchs:\n  seed: 5\n")
    assert seed_of(run("archs", env={"BDSAN_CONFIG": str(path)})) == 5


def test_config_paths_resolve_next_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "bdsan.toml"
    path.write_text('report = "out.json"\n')
    monkeypatch.chdir(tmp_path)
    assert run("archs", "--config", path).code == 0
    assert json.loads((tmp_path / "conf" / "out.json").read_text())["command"] == "archs"


@pytest.mark.parametrize("text, message", [
    ("sed = 1\n", "unknown option(s) sed"),
    ("[archs]\nmax_asr = 0.1\n", "unknown option(s) archs.max_asr"),
    ("[nocommand]\nseed = 1\n", "no command named nocommand"),
    ("seed = \n", "cannot parse"),
])
def test_bad_config_is_a_usage_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run("archs", "--config", path)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_config_is_a_usage_error(tmp_path):
    result = run("archs", "--config", tmp_path / "nope.toml")
    assert result.code == 2 and "file not found" in result.stderr


def test_bad_env_value_is_a_usage_error():
    result = run("archs", env={"BDSAN_SEED": "many"})
    assert result.code == 2 and "seed" in result.stderr.lower()


def test_json_format_prints_only_json_even_when_libraries_print(monkeypatch):
    from bdsan.io import archs

    original = archs.list_archs

    def chatty():
        print("a library talking on stdout")
        return original()

    monkeypatch.setattr(archs, "list_archs", chatty)
    result = run("archs", "--format", "json")
    assert json.loads(result.stdout)["command"] == "archs"
    assert "a library talking" in result.stderr
