"""The AFTER loop end to end on a tiny synthesized corpus, and exact resume after SIGKILL.

One uninterrupted run (in this process, on the session Ray) is the reference. A second run in a
subprocess is killed with SIGKILL at three places (mid fine-tuning, mid selection, between a
state file's temp write and its rename) and resumed each time; it must end with exactly the
same selections, labels and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from after_ray.al.state import RunState, check_run_dir
from after_ray.config import load_config
from after_ray.manifest import read_manifest
from after_ray.runner import run_active_learning

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "run": {"name": "tiny", "seed": 3},
    "corpus": {
        "name": "synth",
        "synth": {"n_speakers": 6, "utterances_per_emotion": 3, "seed": 1},
        "split": {"method": "speaker", "val_fraction": 0.17, "test_fraction": 0.17, "seed": 0},
    },
    "tapt": {"steps": 8, "warmup_steps": 2, "checkpoint_every": 4, "batch_size": 8},
    "finetune": {"epochs": 2, "batch_size": 8},
    "al": {
        "strategy": "after",
        "cold_start": "after_init",
        "mc_dropout_samples": 2,
        "budget": {"unit": "fraction", "initial": 0.25, "per_round": 0.25, "max_total": 0.75},
    },
    "ray": {"num_workers": 0, "scoring_batch_size": 8},
}


def tiny_config_file(tmp: Path, corpus_root: Path) -> Path:
    data = json.loads(json.dumps(TINY))
    data["run"]["output_dir"] = str(tmp / "runs")
    data["corpus"]["root"] = str(corpus_root)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def outcome(run_dir: Path) -> dict:
    """Everything acquired: selections per round, labels, and test metrics."""
    with RunState.open(run_dir) as state:
        rounds = state.rounds()
        return {
            "selections": {r: state.selection(r) for r in rounds},
            "labels": {
                u: (e["label"], e.get("votes"), e["round"]) for u, e in state.labels().items()
            },
            "ua": {r: state.metrics(r)["test"]["ua"] for r in rounds},
            "confusion": {r: state.metrics(r)["test"]["confusion"] for r in rounds},
        }


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    from after_ray.corpora.synth import synthesize_corpus

    s = TINY["corpus"]["synth"]
    root = tmp_path_factory.mktemp("corpus") / "synth"
    return synthesize_corpus(
        root,
        n_speakers=s["n_speakers"],
        utterances_per_emotion=s["utterances_per_emotion"],
        seed=s["seed"],
    )


@pytest.fixture(scope="module")
def reference(ray_session, corpus_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(tiny_config_file(tmp, corpus_root))
    result = run_active_learning(config)
    assert result.finished
    return config.run_dir


@pytest.mark.slow
def test_a_tiny_run_goes_end_to_end(reference):
    got = outcome(reference)
    sizes = [len(s) for s in got["selections"].values()]
    assert sizes == [12, 12, 12]  # 25% steps of a 48-utterance pool, to 75%
    all_selected = [u for s in got["selections"].values() for u in s]
    assert len(set(all_selected)) == len(all_selected)  # nothing selected twice
    assert set(got["labels"]) == set(all_selected)
    for r, ids in got["selections"].items():
        assert {got["labels"][u][2] for u in ids} == {r}  # labeled in the round that chose it
    metrics = json.loads((reference / "rounds" / "round_002" / "metrics.json").read_text())
    assert metrics["n_labeled"] == 36 and metrics["labeled_fraction"] == pytest.approx(0.75)
    assert 0.0 <= metrics["test"]["ua"] <= 1.0 and len(metrics["test"]["confusion"]) == 4
    assert metrics["cumulative_wall_s"] > 0
    assert check_run_dir(reference) == []
    info = json.loads((reference / "run_info.json").read_text())
    assert info["strategy"] == "after" and info["pool_size"] == 48


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_three_times_then_resumed_equals_uninterrupted(reference, corpus_root, tmp_path):
    config_file = tiny_config_file(tmp_path, corpus_root)
    run_dir = load_config(config_file).run_dir
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "after_ray", "run", "--config", str(config_file)]
    for point in ("finetune_epoch@2", "select:1", "state_write@3"):
        proc = subprocess.run(
            command,
            env={**env, "AFTER_RAY_FAILPOINT": point},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-3000:])
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome(run_dir) == outcome(reference)
    assert check_run_dir(run_dir) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_human_oracle_round_trip_through_the_cli(ray_session, corpus_root, tmp_path, capsys):
    """The run stops for labels; a bad answers file is rejected whole; a good one continues."""
    import csv

    from after_ray.cli import main

    data = json.loads(json.dumps(TINY))
    data["run"].update(output_dir=str(tmp_path / "runs"), name="human")
    data["corpus"]["root"] = str(corpus_root)
    # No MC-dropout samples: entropy needs none (and this covers scoring without them).
    data["al"].update(
        cold_start="random", strategy="entropy", oracle={"kind": "human"}, mc_dropout_samples=0
    )
    data["al"]["budget"].update(max_total=0.5)
    data["tapt"]["enabled"] = False
    data["finetune"]["epochs"] = 1
    config_file = tmp_path / "human.yaml"
    config_file.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs" / "human"

    assert main(["run", "--config", str(config_file)]) == 0
    assert "need labels" in capsys.readouterr().out
    sheet = run_dir / "labeling" / "round_000_to_label.csv"
    rows = list(csv.DictReader(sheet.open()))
    assert len(rows) == 12 and all(r["label"] == "" for r in rows)
    assert (run_dir / "labeling" / "round_000_label_studio_tasks.json").is_file()

    manifest_rows = read_manifest(run_dir / "manifest.parquet").to_pylist()
    truth = {r["utt_id"]: r["label"] for r in manifest_rows}
    labels_file = run_dir / "labels.jsonl"
    before = labels_file.read_bytes() if labels_file.exists() else b""

    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["utt_id", "path", "duration_s", "label"])
        for i, r in enumerate(rows):
            writer.writerow(
                [r["utt_id"], r["path"], r["duration_s"], "bored" if i == 0 else truth[r["utt_id"]]]
            )
        writer.writerow(["synth/not-selected", "", "", "sad"])
    assert main(["label", "import", str(run_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bored" in err and "synth/not-selected" in err
    assert (labels_file.read_bytes() if labels_file.exists() else b"") == before

    good = tmp_path / "good.csv"
    with good.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["utt_id", "path", "duration_s", "label"])
        for r in rows:
            writer.writerow([r["utt_id"], r["path"], r["duration_s"], truth[r["utt_id"]]])
    assert main(["label", "import", str(run_dir), str(good)]) == 0
    assert main(["run", "--config", str(config_file)]) == 0  # trains round 0, selects round 1
    assert (run_dir / "rounds" / "round_000" / "metrics.json").is_file()
    assert (run_dir / "labeling" / "round_001_to_label.csv").is_file()
    with RunState.open(run_dir) as state:
        assert {u: e["label"] for u, e in state.labels().items()} == {
            r["utt_id"]: truth[r["utt_id"]] for r in rows
        }
        assert all(e["source"] == "human" for e in state.labels().values())
