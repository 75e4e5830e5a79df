"""The AFTER loop end to end on a tiny synthesized corpus, and exact resume after SIGKILL.

One uninterrupted run (in this process, on the session Ray) is the reference; it also records
every failpoint it passes. A second run in subprocesses is killed with SIGKILL at 20+ points
drawn at random from that trace (every stage: TAPT, embedding, fine-tuning, scoring, selection,
label writes, state writes) and resumed each time; it must end with exactly the same
selections, labels and metrics, and a clean `after-ray check`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_run import TINY, outcome, synth_corpus, tiny_config_file

from after_ray import faults
from after_ray.config.sections import load_config
from after_ray.data.manifest import read_manifest
from after_ray.models.classifier_io import verify_classifier_dir
from after_ray.pipeline.runner import run_active_learning
from after_ray.store import layout
from after_ray.store.check import check_run_dir
from after_ray.store.run_state import RunState

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return synth_corpus(tmp_path_factory.mktemp("corpus") / "synth")


@pytest.fixture(scope="module")
def reference(ray_session, corpus_root, tmp_path_factory):
    """The uninterrupted run, with the trace of every failpoint it passed."""
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(tiny_config_file(tmp, corpus_root))
    trace = tmp / "failpoints.trace"
    os.environ[faults.TRACE_ENV] = str(trace)
    try:
        result = run_active_learning(config)
    finally:
        del os.environ[faults.TRACE_ENV]
    assert result.finished
    return config.run_dir, trace.read_text().split()


@pytest.mark.slow
def test_a_tiny_run_goes_end_to_end(reference):
    reference, _trace = reference
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


# Which stage a failpoint belongs to, for the harness's coverage rule.
CATEGORIES = {
    "prepare": ("stage:prepare",),
    "tapt": ("stage:tapt", "tapt_step", "tapt_checkpoint"),
    "embedding": ("stage:embed_model", "stage:embed"),
    "fine-tuning": ("stage:finetune", "finetune_step", "finetune_epoch", "finetune_checkpoint"),
    "scoring": ("stage:score_pool", "stage:score_test", "score", "score_actor_batch"),
    "selection": ("stage:select", "select:0", "select:1", "select:2"),
    "labels": ("stage:label", "label_append"),
    "state writes": ("state_write", "dir_staged", "dir_swap"),
}
CATEGORY_OF = {name: cat for cat, names in CATEGORIES.items() for name in names}
N_KILLS = int(os.environ.get("AFTER_RAY_CRASH_KILLS", "22"))


def kill_plan(trace: list[str], n_kills: int, seed: int) -> list[tuple[str, int]]:
    """Random kill points over the reference trace, at least one in every category.

    Each point is ``(name, k)``: die at the k-th time ``name`` is reached *in that process*, k
    counted in the reference trace since the previous point. A resumed process restarts at or
    before the previous kill and then follows the reference trace (every stage is
    deterministic), so it is certain to reach its point, and dies at or before its planned
    position.
    """
    rng = random.Random(seed)
    unknown = sorted({name for name in trace if name not in CATEGORY_OF})
    assert not unknown, f"failpoints without a category: {unknown}"
    by_category: dict[str, list[int]] = {}
    for position, name in enumerate(trace):
        by_category.setdefault(CATEGORY_OF[name], []).append(position)
    positions = {rng.choice(places) for places in by_category.values()}
    rest = [p for p in range(len(trace)) if p not in positions]
    positions |= set(rng.sample(rest, max(0, n_kills - len(positions))))
    plan, previous = [], -1
    for position in sorted(positions):
        name = trace[position]
        plan.append((name, trace[previous + 1 : position + 1].count(name)))
        previous = position
    return plan


# Wall-clock timings: the ONLY values of a round's metrics.json and finetune_summary.json that
# may differ between the killed-and-resumed run and the uninterrupted one (seconds measured on
# this machine at this moment). Everything else in those files (UA, WA, macro-F1, per-class
# recall/precision/F1/support, confusion, losses, best epoch, class weights, counts) must be
# equal, bit for bit: the run is deterministic.
WALL_CLOCK_KEYS = frozenset({"cumulative_wall_s", "train_s", "val_s", "total_s", "cache_build_s"})
# finetune_summary.json also records how the fine-tuning attempt was interrupted (the epoch a
# restarted driver continued from: 0 in the uninterrupted run): a log of the crash, not a
# result, so it is not compared either.
RESUME_LOG_KEYS = frozenset({"resumed_from_epoch"})


def _leaves(doc, path=()):
    """Every scalar of a JSON document as (path, value); dict keys and list positions in path."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _leaves(value, (*path, index))
    else:
        yield path, doc


def _round_files(run_dir: Path, name: str) -> dict[int, dict]:
    rounds = sorted(p for p in (run_dir / layout.ROUNDS_DIR).glob("round_*") if p.is_dir())
    return {int(p.name.split("_")[1]): json.loads((p / name).read_text()) for p in rounds}


def _compared(doc: dict, excluded: frozenset[str]) -> dict[tuple, object]:
    leaves = dict(_leaves(doc))
    for path, value in leaves.items():
        if path[-1] in WALL_CLOCK_KEYS:
            assert isinstance(value, float), (path, value)  # a timing, nothing else, is skipped
    return {path: value for path, value in leaves.items() if path[-1] not in excluded}


def assert_same_metrics(run_dir: Path, reference_dir: Path) -> None:
    """Every value of every round's metrics.json and finetune_summary.json, timings aside."""
    for name, excluded in (
        (layout.METRICS_FILE, WALL_CLOCK_KEYS),
        ("finetune_summary.json", WALL_CLOCK_KEYS | RESUME_LOG_KEYS),
    ):
        got, want = _round_files(run_dir, name), _round_files(reference_dir, name)
        assert sorted(got) == sorted(want) == [0, 1, 2], name
        for round_index in want:
            a = _compared(got[round_index], excluded)
            b = _compared(want[round_index], excluded)
            differing = sorted(
                (str(p), a.get(p), b.get(p)) for p in set(a) | set(b) if a.get(p) != b.get(p)
            )
            assert not differing, (name, round_index, differing[:10])
            # Not vacuous: the metrics a round reports are all among the compared values.
            names = {p[-1] for p in b}
            wanted = (
                {"ua", "wa", "macro_f1", "f1", "precision", "recall", "support", "loss"}
                if name == layout.METRICS_FILE
                else {"train_loss", "val_loss", "val_ua", "best_val_ua", "class_weights"}
            )
            assert wanted <= names | {p[-2] for p in b if len(p) > 1}, (name, wanted - names)


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    """Every round's classifier: the same tensors, bit for bit (the final round's included)."""
    import torch
    from safetensors.torch import load_file

    from after_ray.models.classifier_io import WEIGHTS

    for round_index in (0, 1, 2):
        got = load_file(layout.round_model_dir(run_dir, round_index) / WEIGHTS)
        want = load_file(layout.round_model_dir(reference_dir, round_index) / WEIGHTS)
        assert sorted(got) == sorted(want) and len(want) > 10
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, (round_index, unequal[:5])


def assert_same_selection_scores(run_dir: Path, reference_dir: Path) -> None:
    with RunState.open(run_dir) as got, RunState.open(reference_dir) as want:
        for round_index in want.rounds():
            a = got.selection_table(round_index).column("score").to_pylist()
            b = want.selection_table(round_index).column("score").to_pylist()
            assert a == b, round_index


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_at_random_points_then_resumed_equals_uninterrupted(
    ray_session, reference, corpus_root, tmp_path
):
    """SIGKILL the driver at 20+ random points over every stage; the end equals the reference.

    ``AFTER_RAY_CRASH_SEED`` / ``AFTER_RAY_CRASH_KILLS`` draw another plan (the default is fixed
    so CI is reproducible). The killed drivers join the session's Ray, as ``ray job submit``
    drivers join a cluster.
    """
    reference_dir, trace = reference
    seed = int(os.environ.get("AFTER_RAY_CRASH_SEED", "7"))
    plan = kill_plan(trace, N_KILLS, seed)
    assert len(plan) >= min(20, len(trace))
    config_file = tiny_config_file(tmp_path, corpus_root)
    run_dir = load_config(config_file).run_dir
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    command = [sys.executable, "-m", "after_ray", "run", "--config", str(config_file)]
    print("kill plan:", plan)  # shown with the failure output
    died_in: list[str] = []
    for name, count in plan:
        process_trace = tmp_path / f"trace-{len(died_in)}"
        proc = subprocess.run(
            command,
            env={
                **env,
                faults.ENV: f"{name}@{count}",
                faults.TRACE_ENV: str(process_trace),
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == -9, (name, count, proc.returncode, proc.stderr[-3000:])
        assert process_trace.read_text().split()[-1] == name  # it died where it was told
        died_in.append(CATEGORY_OF[name])
        # Between kills, the directory is always one a resume can continue: only the leftovers
        # of the interrupted write itself (a temporary file, a half-swapped directory, a label
        # line torn mid-append), which the resume cleans up.
        leftovers = ("interrupted", "does not exist", "torn by a crash mid-append")
        for problem in check_run_dir(run_dir):
            assert any(kind in problem for kind in leftovers), problem
    missing = set(CATEGORIES) - set(died_in) - {"prepare"}
    assert not missing, f"no kill in {missing}; plan {plan}"

    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome(run_dir) == outcome(reference_dir)
    assert_same_metrics(run_dir, reference_dir)
    assert_same_selection_scores(run_dir, reference_dir)
    assert_same_weights(run_dir, reference_dir)
    assert check_run_dir(run_dir) == []
    # No label lost or written twice: one line per labeled item, all of them selected.
    lines = (run_dir / "labels.jsonl").read_text().splitlines()
    ids = [json.loads(line)["utt_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 36

    # A round's model damaged on disk after the fact is rebuilt, not used and not fatal.
    weights = run_dir / "rounds" / "round_001" / "model" / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert run_active_learning(load_config(config_file)).finished
    verify_classifier_dir(weights.parent)
    assert outcome(run_dir) == outcome(reference_dir)
    assert_same_weights(run_dir, reference_dir)  # the rebuilt round-1 model too


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
    # The import is killed mid-write (half of its batch on disk, the last line torn); the same
    # command again completes it, with every label stored exactly once.
    killed = subprocess.run(
        [sys.executable, "-m", "after_ray", "label", "import", str(run_dir), str(good)],
        env={**os.environ, faults.ENV: "label_append"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    torn = labels_file.read_bytes()
    assert len(torn) > len(before) and not torn.endswith(b"\n")
    assert any("torn" in p or "unterminated" in p for p in check_run_dir(run_dir))
    assert main(["label", "import", str(run_dir), str(good)]) == 0
    lines = labels_file.read_text().splitlines()
    assert sorted(json.loads(line)["utt_id"] for line in lines) == sorted(r["utt_id"] for r in rows)
    assert main(["run", "--config", str(config_file)]) == 0  # trains round 0, selects round 1
    assert (run_dir / "rounds" / "round_000" / "metrics.json").is_file()
    assert (run_dir / "labeling" / "round_001_to_label.csv").is_file()
    with RunState.open(run_dir) as state:
        assert {u: e["label"] for u, e in state.labels().items()} == {
            r["utt_id"]: truth[r["utt_id"]] for r in rows
        }
        assert all(e["source"] == "human" for e in state.labels().values())
