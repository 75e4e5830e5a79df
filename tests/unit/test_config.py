"""Config loading: YAML + dotted overrides, and clear messages (exit code 2) for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from after_ray.cli import main
from after_ray.config.sections import Config, config_from_dict, load_config
from after_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = load_config()
    assert isinstance(config, Config)
    again = load_config(write(tmp_path, config.to_yaml()))
    assert again == config


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "al:\n  budget:\n    max_total: 0.3\nrun:\n  seed: 4\n")
    config = load_config(
        path,
        ["al.budget.max_total=0.25", "tapt.steps=12", "tapt.warmup_steps=2", "al.strategy=entropy"],
    )
    assert config.al.budget.max_total == 0.25
    assert config.run.seed == 4
    assert config.tapt.steps == 12
    assert config.al.strategy == "entropy"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["al.budget.max_totl=0.2"],
            "al.budget.max_totl: unknown key (did you mean 'al.budget.max_total'?)",
        ),
        (
            ["al.budget.max_total=1.5"],
            "al.budget.max_total: a fraction of the pool must be at most 1",
        ),
        (["al.budget.initial=-0.1"], "al.budget.initial: must be positive"),
        (["tapt.steps=many"], "tapt.steps: expected an integer"),
        (["ray.use_gpu=maybe"], "ray.use_gpu: expected true or false"),
        (["corpus.split.method=random"], "corpus.split.method: must be one of"),
        (
            ["corpus.name=iemocap", "corpus.root=/no/such/dir"],
            "corpus.root: directory '/no/such/dir' does not exist",
        ),
        (["corpus.name=iemocap"], "corpus.root: required for corpus 'iemocap'"),
        (["nonsense"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["al.budget.max_total=2", "tapt.stepz=3"])
    text = str(info.value)
    assert "al.budget.max_total" in text and "tapt.stepz" in text


def test_bad_yaml_file_messages(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_message_and_exits_2_without_traceback(capsys):
    code = main(["config", "al.budget.max_total=-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "al.budget.max_total: must be positive" in err
    assert "Traceback" not in err


def test_cli_subprocess_exit_code_is_2():
    proc = subprocess.run(
        [sys.executable, "-m", "after_ray", "config", "corpus.name=nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "corpus.name: unknown corpus 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_fail_only_on_a_missing_corpus_root(path):
    """Real corpora are not on this machine: a shipped config may fail on exactly one kind of
    problem, a ``corpus.root`` (or ``corpus.parts[i].root``) that does not exist, and the message
    says where to point it. Anything else wrong (the test below proves the rest passes) fails."""
    import re

    missing_root = re.compile(
        r"^  - corpus\.(root|parts\[\d\]\.root): directory '[^']+' does not exist "
        r"\(point it at the (\w+ )?corpus on disk\)$"
    )
    try:
        load_config(path)
    except ConfigError as exc:
        header, *problems = str(exc).splitlines()
        assert header == "invalid configuration:"
        assert problems and all(missing_root.match(line) for line in problems), str(exc)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_after_ray_config_accepts_every_shipped_config_and_prints_it_back(path, tmp_path):
    """`after-ray config` is the validator a user runs first: with the corpus roots pointed at a
    folder that exists, every shipped config passes (exit 0), and the YAML it prints loads back
    to the same configuration."""
    import subprocess
    import sys

    import yaml

    data = yaml.safe_load(path.read_text())
    corpus = data.setdefault("corpus", {})
    if corpus.get("name") != "synth":
        corpus["root"] = str(tmp_path)
    for part in corpus.get("parts") or []:
        part["root"] = str(tmp_path)
    config_file = tmp_path / path.name
    config_file.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-m", "after_ray", "config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert config_from_dict(yaml.safe_load(done.stdout)) == load_config(config_file)
