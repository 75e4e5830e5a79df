"""Every `after-ray` command once, in a subprocess, as a user runs it, with its output checked.

One tiny run directory is shared by the module (its stages are module-scoped fixtures, so any
test can also run alone): ``prepare`` -> ``tapt`` -> ``run`` (3 rounds of 12 on a 48-utterance
pool), ``finetune`` (the full-data reference), ``score``, ``check`` (a clean run and a damaged
copy), ``report``, ``export`` (loaded back with ``transformers.pipeline``), ``label export`` /
``label import`` on a human-oracle run, ``config``, the ``bench`` subcommands no other test runs
for real (audio, select, finetune), and ``demo`` with a tiny override set.

Each command starts its own local Ray, as it does on a laptop (RAY_ADDRESS is removed from its
environment), and runs in a scratch directory, so a command that wrote outside its configured
paths would leave files there (checked at the end of the module). The values asserted come from
the files the commands wrote, not from the commands' own messages only: a stub command that
printed the right line would fail every test here.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from tiny_run import TINY, tiny_config_file

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["angry", "happy", "neutral", "sad"]
# TINY: 6 voices x 4 emotions x 3 utterances; the speaker split puts 4 voices in the pool.
N_UTTERANCES, POOL, PER_ROUND = 72, 48, 12
ROUNDS = 3  # 25%, 50%, 75% of the pool
COMMAND_TIMEOUT_S = 300


def after_ray(*args, cwd: Path, timeout: float = COMMAND_TIMEOUT_S, script: bool = False):
    """``python -m after_ray ARGS`` (or the ``after-ray`` console script) in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a command on a laptop starts its own Ray
    if script:
        command = [str(Path(sys.executable).with_name("after-ray"))]
    else:
        command = [sys.executable, "-m", "after_ray"]
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    """The command's stdout, after checking that it exited 0."""
    assert proc.returncode == 0, (
        f"{proc.args[1:]} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def lines_starting(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def read_json(path: Path):
    return json.loads(path.read_text())


def metrics(run_dir: Path, r: int) -> dict:
    return read_json(run_dir / "rounds" / f"round_{r:03d}" / "metrics.json")


def manifest_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "manifest.parquet").to_pylist()


def selection(run_dir: Path, r: int) -> list[str]:
    rows = pq.read_table(run_dir / "rounds" / f"round_{r:03d}" / "selection.parquet").to_pylist()
    return [row["utt_id"] for row in sorted(rows, key=lambda row: row["rank"])]


def label_entries(run_dir: Path) -> list[dict]:
    path = run_dir / "labels.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ the shared tiny run
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Scratch dir: the commands' cwd, the config, the corpus (built by prepare) and runs/."""
    root = tmp_path_factory.mktemp("cli")
    (root / "cwd").mkdir()
    config = tiny_config_file(root, root / "synth")
    yield {"root": root, "cwd": root / "cwd", "config": config, "run_dir": root / "runs" / "tiny"}
    # Nothing was written outside the configured paths (relative runs/, data/, ...).
    assert sorted(p.name for p in (root / "cwd").iterdir()) == []


@pytest.fixture(scope="module")
def prepared(ws):
    return after_ray("prepare", "--config", ws["config"], cwd=ws["cwd"])


@pytest.fixture(scope="module")
def tapted(ws, prepared):
    ok(prepared)
    return after_ray("tapt", "--config", ws["config"], cwd=ws["cwd"])


@pytest.fixture(scope="module")
def al_run(ws, tapted):
    ok(tapted)
    return after_ray("run", "--config", ws["config"], cwd=ws["cwd"])


@pytest.fixture(scope="module")
def full_run(ws, tapted):
    ok(tapted)
    return after_ray("finetune", "--config", ws["config"], cwd=ws["cwd"])


@pytest.fixture(scope="module")
def test_scores(ws, al_run):
    """`after-ray score` of the test split with the last round's model: (stdout, cache dir)."""
    ok(al_run)
    model = ws["run_dir"] / "rounds" / f"round_{ROUNDS - 1:03d}" / "model"
    out = ok(
        after_ray(
            "score", "--config", ws["config"], "--model", model, "--split", "test", cwd=ws["cwd"]
        )
    )
    return out, Path(lines_starting(out, "scores: ")[-1].removeprefix("scores: "))


# ------------------------------------------------------------------------------- stages
@pytest.mark.slow
def test_prepare_writes_the_manifest_and_the_quarantine_table(ws, prepared):
    out = ok(prepared)
    run_dir = ws["run_dir"]
    assert f"manifest: {N_UTTERANCES} utterances -> {run_dir / 'manifest.parquet'}" in out
    quarantine = run_dir / "quarantine.parquet"
    assert f"quarantine: 0 of {N_UTTERANCES} files (0.0%) -> {quarantine}" in out
    # The synthesized corpus was built where corpus.root says, and the manifest points into it.
    corpus = ws["root"] / "synth"
    assert (corpus / "labels.csv").is_file()
    rows = manifest_rows(run_dir)
    assert len(rows) == len({r["utt_id"] for r in rows}) == N_UTTERANCES
    assert all(Path(r["path"]).is_file() and Path(r["path"]).is_relative_to(corpus) for r in rows)
    assert all(r["duration_s"] > 0 and r["sample_rate"] == 16000 for r in rows)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert {s: len({r["speaker"] for r in v}) for s, v in by_split.items()} == {
        "train": 4,
        "val": 1,
        "test": 1,
    }
    assert len(by_split["train"]) == POOL
    for split_rows in by_split.values():
        assert sorted({r["label"] for r in split_rows}) == CLASSES
    assert pq.read_table(quarantine).num_rows == 0
    assert (run_dir / "quarantine.csv").is_file()


@pytest.mark.slow
def test_tapt_writes_the_pretrained_backbone_and_its_losses(ws, tapted):
    out = ok(tapted)
    backbone = Path(lines_starting(out, "TAPT backbone: ")[-1].removeprefix("TAPT backbone: "))
    assert backbone.parent == ws["root"] / "runs" / "_tapt"
    assert f"tapt: {TINY['tapt']['steps']} steps on {POOL} utterances ..." in out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (backbone / name).stat().st_size > 0, name
    losses = read_json(backbone / "tapt_losses.json")["loss_history"]
    assert len(losses) == TINY["tapt"]["steps"] and all(np.isfinite(losses))
    state = read_json(ws["run_dir"] / "state.json")
    assert Path(state["stages"]["tapt"]["backbone_dir"]) == backbone


@pytest.mark.slow
def test_run_selects_labels_trains_and_evaluates_every_round(ws, tapted, al_run):
    out = ok(al_run)
    run_dir = ws["run_dir"]
    assert lines_starting(out, "run finished: ") == [f"run finished: {run_dir}"]
    # The rounds start from the model `after-ray tapt` made in this run dir: no TAPT again.
    backbone = lines_starting(tapted.stdout, "TAPT backbone: ")[-1].removeprefix("TAPT backbone: ")
    assert not lines_starting(out, "tapt:")
    assert read_json(run_dir / "state.json")["stages"]["tapt"]["backbone_dir"] == backbone
    labels = label_entries(run_dir)
    assert len(labels) == len({e["utt_id"] for e in labels}) == ROUNDS * PER_ROUND
    truth = {r["utt_id"]: r["label"] for r in manifest_rows(run_dir)}
    pool = {r["utt_id"] for r in manifest_rows(run_dir) if r["split"] == "train"}
    for r in range(ROUNDS):
        chosen = selection(run_dir, r)
        assert len(chosen) == len(set(chosen)) == PER_ROUND and set(chosen) <= pool
        # The simulated oracle labeled exactly the round's selection, with the true labels.
        round_labels = {e["utt_id"]: e["label"] for e in labels if e["round"] == r}
        assert round_labels == {u: truth[u] for u in chosen}
        m = metrics(run_dir, r)
        assert m["n_labeled"] == (r + 1) * PER_ROUND
        assert m["labeled_fraction"] == pytest.approx((r + 1) * PER_ROUND / POOL)
        assert m["test"]["n"] == 12 and np.sum(m["test"]["confusion"]) == 12
        assert (
            run_dir / "rounds" / f"round_{r:03d}" / "model" / "classifier.safetensors"
        ).is_file()
        # The progress line reports the metrics file's numbers.
        t = m["test"]
        assert (
            f"round {r}: {m['n_labeled']} labels ({m['labeled_fraction']:.0%}) -> test UA "
            f"{t['ua']:.3f}, WA {t['wa']:.3f}, macro-F1 {t['macro_f1']:.3f}"
        ) in out
    assert selection(run_dir, 0) and metrics(run_dir, 0)["strategy"] == "after_init"
    assert metrics(run_dir, 1)["strategy"] == "after"
    assert "finished" in read_json(run_dir / "state.json")["stages"]


@pytest.mark.slow
def test_finetune_trains_on_the_whole_pool_in_its_own_run_dir(ws, full_run):
    out = ok(full_run)
    full_dir = ws["root"] / "runs" / "tiny-full"
    assert lines_starting(out, "full-data fine-tune finished: ") == [
        f"full-data fine-tune finished: {full_dir}"
    ]
    assert read_json(full_dir / "run_info.json")["kind"] == "full_data"
    m = metrics(full_dir, 0)
    assert (m["n_labeled"], m["labeled_fraction"]) == (POOL, 1.0)
    pool = {r["utt_id"] for r in manifest_rows(full_dir) if r["split"] == "train"}
    assert {e["utt_id"] for e in label_entries(full_dir)} == pool
    assert not (full_dir / "rounds" / "round_001").exists()
    assert (full_dir / "rounds" / "round_000" / "model" / "classifier.safetensors").is_file()


@pytest.mark.slow
def test_score_writes_each_splits_scores_and_agrees_with_the_runs_metrics(ws, test_scores):
    out, cache = test_scores
    run_dir = ws["run_dir"]
    rows = manifest_rows(run_dir)
    test_ids = {r["utt_id"] for r in rows if r["split"] == "test"}
    assert cache.parent == run_dir / "scores" / "test"
    assert f"scored {len(test_ids)} utterances of split 'test'" in out
    table = pq.read_table(cache / "scores.parquet").to_pylist()
    assert read_json(cache / "_DONE.json")["rows"] == len(table) == len(test_ids)
    assert {r["utt_id"] for r in table} == test_ids
    probs = np.array([r["probs"] for r in table])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The last round's test metrics are these scores' predictions.
    truth = {r["utt_id"]: CLASSES.index(r["label"]) for r in rows}
    confusion = np.zeros((4, 4), dtype=int)
    for row, p in zip(table, probs, strict=True):
        confusion[truth[row["utt_id"]], int(np.argmax(p))] += 1
    assert confusion.tolist() == metrics(run_dir, ROUNDS - 1)["test"]["confusion"]

    # A split the run never scored: computed now, into a new cache directory.
    assert not (run_dir / "scores" / "val").exists()
    model = run_dir / "rounds" / "round_000" / "model"
    val_out = ok(
        after_ray(
            "score", "--config", ws["config"], "--model", model, "--split", "val", cwd=ws["cwd"]
        )
    )
    val_cache = Path(lines_starting(val_out, "scores: ")[-1].removeprefix("scores: "))
    assert val_cache.parent == run_dir / "scores" / "val"
    val_table = pq.read_table(val_cache / "scores.parquet")
    assert set(val_table["utt_id"].to_pylist()) == {
        r["utt_id"] for r in rows if r["split"] == "val"
    }
    assert read_json(val_cache / "_DONE.json")["rows"] == val_table.num_rows == 12


# ------------------------------------------------------------------- run-dir commands
@pytest.mark.slow
def test_check_passes_the_run_and_names_each_problem_of_a_damaged_copy(ws, al_run):
    ok(al_run)
    run_dir = ws["run_dir"]
    assert ok(after_ray("check", run_dir, cwd=ws["cwd"])).strip() == f"{run_dir}: consistent"

    damaged = ws["root"] / "damaged"
    shutil.copytree(run_dir, damaged)
    first = label_entries(damaged)[0]
    other = next(c for c in CLASSES if c != first["label"])
    with (damaged / "labels.jsonl").open("a") as handle:
        handle.write(json.dumps({**first, "label": other}) + "\n")
    (damaged / "rounds" / "round_001" / "metrics.json").write_text("{not json")
    proc = after_ray("check", damaged, cwd=ws["cwd"])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    problems = lines_starting(proc.stdout, "- ")
    assert len(problems) == 2, proc.stdout
    n_lines = ROUNDS * PER_ROUND + 1
    assert problems[0].startswith(
        f"- {damaged / 'labels.jsonl'} line {n_lines}: {first['utt_id']!r} is labeled again, "
        f"a conflicting label ({other!r} vs {first['label']!r}) of line 1"
    ), problems[0]
    assert f"{damaged / 'rounds' / 'round_001' / 'metrics.json'}" in problems[1]
    assert "cannot be read" in problems[1]

    missing = after_ray("check", ws["root"] / "no-such-run", cwd=ws["cwd"])
    assert missing.returncode == 1 and "no such directory" in missing.stdout


def _aulc(fractions: list[float], values: list[float]) -> float:
    x, y = np.asarray(fractions), np.asarray(values)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


@pytest.mark.slow
def test_report_writes_markdown_json_and_figures_with_the_runs_numbers(ws, al_run, full_run):
    ok(al_run)
    ok(full_run)
    run_dir, full_dir, out_dir = (
        ws["run_dir"],
        ws["root"] / "runs" / "tiny-full",
        ws["root"] / "rep",
    )
    out = ok(
        after_ray(
            "report",
            run_dir,
            "--reference",
            full_dir,
            "--out",
            out_dir,
            "--title",
            "CLI test",
            cwd=ws["cwd"],
        )
    )
    assert out.strip() == f"report: {out_dir / 'report.md'}"
    for name in ("learning_curves.png", "ua_vs_time.png", "confusion.png", "selection_balance.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
    md = (out_dir / "report.md").read_text()
    assert md.startswith("# CLI test\n")
    assert "2 run(s): 1 curve group(s), 1 full-data reference(s)." in md

    rounds = [metrics(run_dir, r) for r in range(ROUNDS)]
    # Each round's row of the run's table holds the numbers of its metrics.json.
    for m in rounds:
        t = m["test"]
        row = (
            f"| {m['round']} | {m['labeled_fraction'] * 100:.1f}% | {m['n_labeled']} | "
            f"{t['ua'] * 100:.1f} | {t['wa'] * 100:.1f} | {t['macro_f1'] * 100:.1f} |"
        )
        assert row in md, (row, md)
    fractions = [m["labeled_fraction"] for m in rounds]
    aulc = {k: _aulc(fractions, [m["test"][k] for m in rounds]) for k in ("ua", "wa", "macro_f1")}
    assert (
        f"AULC over 25.0%–75.0% of the pool ({ROUNDS} rounds): UA {aulc['ua'] * 100:.1f}, "
        f"WA {aulc['wa'] * 100:.1f}, macro-F1 {aulc['macro_f1'] * 100:.1f}."
    ) in md
    last = rounds[-1]["test"]
    assert (
        f"| after | 1 (3) | 25.0%–75.0% | {last['ua'] * 100:.1f} | {last['wa'] * 100:.1f} | "
        f"{last['macro_f1'] * 100:.1f} | {aulc['ua'] * 100:.1f} | {aulc['wa'] * 100:.1f} |"
    ) in md
    ref = metrics(full_dir, 0)["test"]
    assert (
        f"| full-data fine-tune | 1 (3) | 100.0% | {ref['ua'] * 100:.1f} | {ref['wa'] * 100:.1f} |"
    ) in md

    report = read_json(out_dir / "report.json")
    assert report["title"] == "CLI test"
    (group,) = report["groups"]
    assert group["aulc"]["ua"]["mean"] == pytest.approx(aulc["ua"])
    assert [Path(d) for d in group["run_dirs"]] == [run_dir]
    (reference,) = report["references"]
    assert [Path(d) for d in reference["run_dirs"]] == [full_dir]


@pytest.mark.slow
def test_export_gives_a_pipeline_that_classifies_like_the_last_round(ws, al_run, test_scores):
    ok(al_run)
    out_dir = ws["root"] / "hf"
    out = ok(after_ray("export", ws["run_dir"], "--out", out_dir, cwd=ws["cwd"]))
    assert out.strip() == f"Hugging Face audio-classification model: {out_dir}"
    config = read_json(out_dir / "config.json")
    assert config["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    assert read_json(out_dir / "after_ray_export.json")["class_names"] == CLASSES

    import soundfile as sf
    from transformers import pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    classify = pipeline("audio-classification", model=str(out_dir), device="cpu")
    _, cache = test_scores  # the last round's model, scored by `after-ray score`
    paths = {r["utt_id"]: r["path"] for r in manifest_rows(ws["run_dir"])}
    scored = pq.read_table(cache / "scores.parquet").to_pylist()
    assert len(scored) == 12
    for row in scored:
        wave, rate = sf.read(paths[row["utt_id"]], dtype="float32")
        answer = classify({"raw": wave, "sampling_rate": rate}, top_k=len(CLASSES))
        got = {a["label"]: a["score"] for a in answer}
        assert sorted(got) == CLASSES
        np.testing.assert_allclose([got[c] for c in CLASSES], row["probs"], atol=1e-5)
        assert answer[0]["label"] == CLASSES[int(np.argmax(row["probs"]))]

    # A round that was not trained is refused with the trained ones named, exit code 2.
    proc = after_ray(
        "export", ws["run_dir"], "--out", ws["root"] / "hf9", "--round", 9, cwd=ws["cwd"]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "after-ray: error: round 9 of" in proc.stderr and "trained rounds: [0, 1, 2]" in proc.stderr
    )


@pytest.mark.slow
def test_label_export_and_import_for_a_human_oracle_run(ws, tapted):
    ok(tapted)
    run_dir = ws["root"] / "runs" / "human"
    common = ("--config", ws["config"], "run.name=human", "al.oracle.kind=human")
    out = ok(after_ray("run", *common, "al.cold_start=random", cwd=ws["cwd"]))
    assert "waiting for labels of round 0 (see above)" in out
    assert not label_entries(run_dir)
    chosen = selection(run_dir, 0)
    assert len(chosen) == PER_ROUND

    # `label export` writes the batch again (here from nothing) and prints where.
    shutil.rmtree(run_dir / "labeling")
    out = ok(after_ray("label", "export", run_dir, cwd=ws["cwd"]))
    labeling = run_dir / "labeling"
    assert out.splitlines() == [
        str(labeling / "round_000_to_label.csv"),
        str(labeling / "round_000_label_studio_tasks.json"),
    ]
    tasks = read_json(labeling / "round_000_label_studio_tasks.json")
    assert [t["data"]["utt_id"] for t in tasks] == chosen
    assert all(t["data"]["round"] == 0 and Path(t["data"]["audio"]).is_file() for t in tasks)
    sheet = list(csv.DictReader((labeling / "round_000_to_label.csv").open()))
    assert [r["utt_id"] for r in sheet] == chosen and all(r["label"] == "" for r in sheet)
    xml = (labeling / "round_000_label_studio_config.xml").read_text()
    assert all(f'<Choice value="{c}"/>' in xml for c in CLASSES)

    truth = {r["utt_id"]: r["label"] for r in manifest_rows(run_dir)}
    # An answers file with a label outside the label set: refused whole, nothing written.
    bad = ws["root"] / "bad_answers.csv"
    with bad.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["utt_id", "label"])
        writer.writerows([[u, "bored" if i == 0 else truth[u]] for i, u in enumerate(chosen)])
    proc = after_ray("label", "import", run_dir, bad, cwd=ws["cwd"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("after-ray: error:") and "bored" in proc.stderr
    assert not label_entries(run_dir)

    good = ws["root"] / "answers.csv"
    with good.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["utt_id", "label"])
        writer.writerows([[u, truth[u]] for u in chosen])
    out = ok(after_ray("label", "import", run_dir, good, cwd=ws["cwd"]))
    assert out.strip() == f"imported {PER_ROUND} labels into {run_dir}"
    entries = label_entries(run_dir)
    assert {e["utt_id"]: e["label"] for e in entries} == {u: truth[u] for u in chosen}
    assert all(e["round"] == 0 and e["source"] == "human" for e in entries)
    assert ok(after_ray("check", run_dir, cwd=ws["cwd"])).strip() == f"{run_dir}: consistent"


def test_config_prints_the_resolved_values(tmp_path):
    config = tiny_config_file(tmp_path, tmp_path / "synth")
    out = ok(
        after_ray(
            "config",
            "--config",
            config,
            "tapt.steps=5",
            "al.strategy=entropy",
            cwd=tmp_path,
            script=True,
        )
    )
    resolved = yaml.safe_load(out)
    assert resolved["tapt"]["steps"] == 5 and resolved["al"]["strategy"] == "entropy"
    # From the file ...
    assert resolved["run"]["output_dir"] == str(tmp_path / "runs")
    assert resolved["corpus"]["synth"]["n_speakers"] == 6
    assert resolved["al"]["budget"]["max_total"] == 0.75
    # ... and the defaults the file leaves out.
    assert resolved["audio"]["sample_rate"] == 16000
    assert resolved["backbone"]["name_or_path"] == "tiny"
    assert sorted(resolved) == sorted(
        ["run", "corpus", "audio", "backbone", "tapt", "finetune", "al", "ray"]
    )
    bad = after_ray("config", "--config", config, "tapt.stpes=5", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'tapt.steps'" in bad.stderr
    assert not list(tmp_path.glob("runs"))


# Commands and the tests that run them for real, in a subprocess or in-process with their
# output checked (bench al, bench load and bench ingest: tests/integration/test_bench_al.py,
# test_cli_bench.py, test_bench_ingest.py).
COVERED = {
    "demo": "test_demo_runs_every_arm_and_writes_the_report",
    "prepare": "test_prepare_writes_the_manifest_and_the_quarantine_table",
    "run": "test_run_selects_labels_trains_and_evaluates_every_round",
    "tapt": "test_tapt_writes_the_pretrained_backbone_and_its_losses",
    "finetune": "test_finetune_trains_on_the_whole_pool_in_its_own_run_dir",
    "score": "test_score_writes_each_splits_scores_and_agrees_with_the_runs_metrics",
    "label": "test_label_export_and_import_for_a_human_oracle_run",
    "check": "test_check_passes_the_run_and_names_each_problem_of_a_damaged_copy",
    "report": "test_report_writes_markdown_json_and_figures_with_the_runs_numbers",
    "sweep": "tests/integration/test_job_submit.py and test_sweep.py",
    "export": "test_export_gives_a_pipeline_that_classifies_like_the_last_round",
    "config": "test_config_prints_the_resolved_values",
    "bench": "test_bench_runs_for_real",
}


def test_every_command_in_the_help_is_covered(tmp_path):
    out = ok(after_ray("--help", cwd=tmp_path, script=True))
    # The command lines of the help: "    NAME   help text", between "COMMAND" and "options:".
    block = out.split("  COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    listed = [line.split()[0] for line in block.splitlines() if line.startswith("    ")]
    assert sorted(listed) == sorted(COVERED), f"a command without a test here: {listed}"
    tests = {name for name in globals() if name.startswith("test_")}
    assert {v for v in COVERED.values() if v.startswith("test_")} <= tests


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["audio", "--n-files", "4", "--seconds", "0.5"],
            [
                "bench audio: 4 files x 0.5 s, 44100/48000 Hz stereo PCM16 -> 16000 Hz mono",
                "(outputs identical to the plain loop)",
            ],
        ),
        (
            ["select", "--n", "2000", "--d", "8", "--k", "20", "--naive-picks", "5"],
            [
                "select benchmark: strategy=coreset n=2000 d=8 k=20 data=random shards=1 seed=0",
                "check: first 5 picks equal: True",
            ],
        ),
        (
            ["finetune", "--utterances", "4", "--backbones", "tiny"],
            [
                "fine-tune epoch time, CNN encoder frozen",
                "| backbone | utterances | audio (s) | epoch without cache (s) |",
                "| tiny | 4 | ",
            ],
        ),
    ],
    ids=["audio", "select", "finetune"],
)
def test_bench_runs_for_real(tmp_path, args, expected):
    out = ok(after_ray("bench", *args, cwd=tmp_path))
    for text in expected:
        assert text in out, (text, out)
    if args[0] == "select":
        assert lines_starting(out, "ours ") and lines_starting(out, "naive greedy")
    assert not list(tmp_path.iterdir())  # temporary files cleaned up


# ------------------------------------------------------------------------------------ demo
DEMO_SEEDS = 5  # after_ray.experiments.demo.DEMO_SEEDS: not configurable
DEMO_OVERRIDES = [
    # 8 voices x 12 utterances (6 voices in the pool: 72), TAPT 4 steps, rounds of 10%.
    "corpus.synth.n_speakers=8",
    "corpus.synth.utterances_per_speaker=12",
    "tapt.steps=4",
    "tapt.warmup_steps=1",
    "tapt.checkpoint_every=4",
    "al.budget.per_round=0.1",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_every_arm_and_writes_the_report(tmp_path):
    """`after-ray demo` with no --config (configs/demo.yaml) and the README's override form:
    5 seeds x (after, random, full data) + the feature baseline, then the report."""
    (tmp_path / "cwd").mkdir()
    runs = tmp_path / "runs"
    out = ok(
        after_ray(
            "demo",
            f"corpus.root={tmp_path / 'synth'}",
            f"run.output_dir={runs}",
            *DEMO_OVERRIDES,
            cwd=tmp_path / "cwd",
        )
    )
    report_md = runs / "demo-report" / "report.md"
    (done,) = lines_starting(out, "demo finished in ")
    assert done.endswith(f"; report: {report_md}")
    assert "(not compared with docs/demo-report: the config differs from demo.yaml)" in out
    for seed in range(DEMO_SEEDS):
        for arm, strategy in (("after", "after"), ("random", "random"), ("full", "full_data")):
            run_dir = runs / f"demo-s{seed}-{arm}"
            info = read_json(run_dir / "run_info.json")
            assert (info["seed"], info["strategy"]) == (seed, strategy), run_dir
            assert "finished" in read_json(run_dir / "state.json")["stages"], run_dir
            if arm != "full":  # 10% to start, rounds of 10% up to 30% of the 72-utterance pool
                assert [metrics(run_dir, r)["n_labeled"] for r in range(3)] == [7, 14, 21]
        assert metrics(runs / f"demo-s{seed}-full", 0)["labeled_fraction"] == 1.0
    # One TAPT model for every run.
    assert len([p for p in (runs / "_tapt").iterdir() if p.is_dir()]) == 1

    report = read_json(runs / "demo-report" / "report.json")
    assert report["title"] == f"after-ray demo (synthesized corpus, {DEMO_SEEDS} seeds)"
    seeds = list(range(DEMO_SEEDS))
    assert {g["label"]: g["seeds"] for g in report["groups"]} == {
        "after": seeds,
        "random": seeds,
        "feature baseline (random labels)": seeds,
    }
    (reference,) = report["references"]
    assert reference["seeds"] == seeds
    md = report_md.read_text()
    for label in ("after", "random", "full-data fine-tune"):
        assert f"| {label} | {DEMO_SEEDS} (0, 1, 2, 3, 4) |" in md, label
    assert (runs / "demo-report" / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "cwd").iterdir())
