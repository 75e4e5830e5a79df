"""Run state: atomic writes, the run lock, the append-only label log, selections, and `check`."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from after_ray.errors import RunStateError
from after_ray.store import atomic
from after_ray.store.check import check_run_dir
from after_ray.store.layout import LABELS_FILE, selection_path
from after_ray.store.run_state import SELECTION_META_KEY, SELECTION_SCHEMA, RunState

REPO_ROOT = Path(__file__).resolve().parents[2]


def _temp_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if atomic.is_temp_file(p.name)]


def _label(utt_id: str, label: str, **extra) -> dict:
    return {"utt_id": utt_id, "label": label, "source": "simulated", **extra}


# --------------------------------------------------------------------------- atomic writes


def test_atomic_json_failing_fsync_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic.atomic_write_json(target, {"version": 1})
    before = target.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(RunStateError) as info:
        atomic.atomic_write_json(target, {"version": 2, "big": "x" * 10_000}, what="the run state")
    message = str(info.value)
    assert "the run state" in message and str(target) in message
    assert "still valid" in message and "disk is full" in message
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_bytes() == before
    assert _temp_leftovers(tmp_path) == []


def test_atomic_parquet_writer_failing_midway_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "table.parquet"
    atomic.atomic_write_parquet(pa.table({"a": [1, 2, 3]}), target)

    def half_then_enospc(table, handle, **kwargs):
        handle.write(b"PAR1 half a parquet file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", half_then_enospc)
    with pytest.raises(RunStateError, match="No space left"):
        atomic.atomic_write_parquet(pa.table({"a": [9]}), target)
    monkeypatch.undo()
    assert pq.read_table(target).column("a").to_pylist() == [1, 2, 3]
    assert _temp_leftovers(tmp_path) == []


def test_atomic_json_unserialisable_value_leaves_no_trace(tmp_path):
    target = tmp_path / "m.json"
    atomic.atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic.atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert _temp_leftovers(tmp_path) == []


def test_atomic_json_writes_numpy_and_nan_as_plain_json(tmp_path):
    import numpy as np

    target = atomic.atomic_write_json(
        tmp_path / "m.json", {"ua": np.float32(0.5), "f1": float("nan"), "cm": np.eye(2, dtype=int)}
    )
    assert json.loads(target.read_text()) == {"ua": 0.5, "f1": None, "cm": [[1, 0], [0, 1]]}


def test_record_metrics_failure_through_run_state_keeps_old_metrics(tmp_path, monkeypatch):
    with RunState.open(tmp_path / "run") as state:
        state.record_metrics(0, {"ua": 0.4})
        monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "x")))
        with pytest.raises(RunStateError, match="metrics of round 0"):
            state.record_metrics(0, {"ua": 0.9})
        monkeypatch.undo()
        assert state.metrics(0) == {"ua": 0.4}


# --------------------------------------------------------------------------- lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from after_ray.store.run_state import RunState
    state = RunState.open(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_second_open_in_same_process_is_refused_with_pid(tmp_path):
    run_dir = tmp_path / "run"
    with RunState.open(run_dir):
        with pytest.raises(RunStateError) as info:
            RunState.open(run_dir)
        assert f"pid {os.getpid()}" in str(info.value)
        assert "in use" in str(info.value)
    # Released on close: the next open works.
    RunState.open(run_dir).close()


def test_lock_held_by_other_process_refused_and_sigkill_releases_it(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunStateError) as info:
            RunState.open(run_dir)
        assert f"pid {holder.pid}" in str(info.value)
        # check_run_dir sees the run as busy but still works without the lock.
        assert check_run_dir(run_dir) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    # The dead holder's lock file is still there, but flock died with the process.
    assert (run_dir / "run.lock").exists()
    with RunState.open(run_dir, create=False) as state:
        assert state.rounds() == []


def test_open_without_create_requires_a_run(tmp_path):
    with pytest.raises(RunStateError, match="does not exist"):
        RunState.open(tmp_path / "nope", create=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunStateError, match="not a run directory"):
        RunState.open(tmp_path / "plain", create=False)


def test_closed_state_refuses_writes(tmp_path):
    state = RunState.open(tmp_path / "run")
    state.close()
    with pytest.raises(RunStateError, match="closed"):
        state.mark_stage_done("prepare", {})


# --------------------------------------------------------------------------- stages & resume


def test_everything_survives_close_and_reopen(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tapt").mkdir(parents=True)
    with RunState.open(run_dir) as state:
        state.ensure_experiment({"corpus": "synth", "seed": 0, "strategy": "entropy"})
        state.mark_stage_done("tapt", {"model_dir": "tapt", "steps": 400})
        state.record_selection(0, ["a", "b"], None, "after_init", {"k": 2})
        state.append_labels(0, [_label("a", "happy"), _label("b", "sad", votes=["sad", "sad"])])
        state.record_checkpoint(0, "tapt")
        state.record_metrics(0, {"ua": 0.5})
        state.record_timing(0, "finetune", 1.5)
        state.record_timing(None, "tapt", 12.0)
    with RunState.open(run_dir, create=False) as state:
        assert state.stage_info("tapt")["steps"] == 400
        assert state.stage_info("embed") is None
        assert state.selection(0) == ["a", "b"]
        assert state.selection_info(0)["extra"] == {"k": 2}
        assert state.labels()["b"]["votes"] == ["sad", "sad"]
        assert state.labeled_round() == {"a": 0, "b": 0}
        assert state.checkpoint(0) == "tapt"
        assert state.metrics(0) == {"ua": 0.5}
        assert [(t["round"], t["stage"], t["seconds"]) for t in state.timings()] == [
            (0, "finetune", 1.5),
            (None, "tapt", 12.0),
        ]
        assert state.round_status(0).phase == "evaluated"
        # Same experiment: fine. A different seed: refused with the field named.
        state.ensure_experiment({"corpus": "synth", "seed": 0, "strategy": "entropy"})
        with pytest.raises(RunStateError, match="seed"):
            state.ensure_experiment({"corpus": "synth", "seed": 1, "strategy": "entropy"})
    assert check_run_dir(run_dir) == []


def test_round_status_follows_the_files(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        assert state.round_status(1).phase == "none"
        state.record_selection(1, ["x", "y"], [0.9, 0.8], "entropy")
        assert state.round_status(1).phase == "selected"
        state.append_labels(1, [_label("x", "angry")])
        status = state.round_status(1)
        assert (status.phase, status.n_labeled, status.n_selected) == ("selected", 1, 2)
        assert state.pending_ids(1) == ["y"]
        state.append_labels(1, [_label("y", "sad")])
        assert state.round_status(1).phase == "labeled"
        state.record_checkpoint(1, "s3://bucket/ckpt")
        assert state.round_status(1).phase == "trained"
        state.record_metrics(1, {"ua": 0.6})
        assert state.round_status(1).phase == "evaluated"


def test_timed_records_only_successful_blocks(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        with state.timed("embed"):
            pass
        with pytest.raises(ZeroDivisionError), state.timed("score", 2):
            1 / 0  # noqa: B018
        assert [t["stage"] for t in state.timings()] == ["embed"]


# --------------------------------------------------------------------------- selections


def test_selection_recording_is_idempotent_and_never_replaced(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        path = state.record_selection(0, ["c", "a", "b"], [3.0, 2.0, 1.0], "entropy")
        table = pq.read_table(path)
        assert table.column("utt_id").to_pylist() == ["c", "a", "b"]
        assert table.column("rank").to_pylist() == [1, 2, 3]
        before = path.read_bytes()
        # A resumed run replays the step: no-op, file untouched.
        state.record_selection(0, ["c", "a", "b"], [3.0, 2.0, 1.0], "entropy")
        assert path.read_bytes() == before
        with pytest.raises(RunStateError, match="never replaced"):
            state.record_selection(0, ["c", "a", "d"], [3.0, 2.0, 1.0], "entropy")
        with pytest.raises(RunStateError, match="never replaced"):
            state.record_selection(0, ["a", "c", "b"], None, "entropy")
        with pytest.raises(RunStateError, match="never replaced"):
            state.record_selection(0, ["c", "a", "b"], [3.0, 2.0, 1.0], "random")
        assert path.read_bytes() == before
        with pytest.raises(ValueError, match="repeats"):
            state.record_selection(1, ["a", "a"], None, "random")
        with pytest.raises(ValueError, match="scores"):
            state.record_selection(1, ["q"], [1.0, 2.0], "random")


def test_selecting_an_already_labeled_item_is_refused(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b"], None, "random")
        state.append_labels(0, [_label("a", "happy")])
        with pytest.raises(RunStateError, match="already labeled"):
            state.record_selection(1, ["c", "a"], None, "entropy")
        assert state.selection(1) is None


# --------------------------------------------------------------------------- labels


def test_labels_are_never_duplicated_or_replaced(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b", "c"], None, "random")
        written = state.append_labels(0, [_label("a", "happy"), _label("b", "sad")])
        assert [w["utt_id"] for w in written] == ["a", "b"]
        log = state.run_dir / LABELS_FILE
        before = log.read_bytes()
        # Identical again (a resumed round): nothing appended.
        assert state.append_labels(0, [_label("a", "happy"), _label("b", "sad")]) == []
        assert log.read_bytes() == before
        # A different label for a labeled item: refused, and nothing of the batch is written.
        with pytest.raises(RunStateError, match="never replaced"):
            state.append_labels(0, [_label("c", "angry"), _label("a", "sad")])
        # Conflicting rows inside one batch: refused too.
        with pytest.raises(RunStateError):
            state.append_labels(0, [_label("c", "angry"), _label("c", "sad")])
        # An item outside the round's selection, or a round without a selection.
        with pytest.raises(RunStateError, match="not in this round's selection"):
            state.append_labels(0, [_label("zzz", "angry")])
        with pytest.raises(RunStateError, match="no selection"):
            state.append_labels(5, [_label("a", "happy")])
        assert log.read_bytes() == before
        assert state.labeled_ids() == ["a", "b"]
        assert state.labeled_ids(round=1) == []
    lines = (tmp_path / "run" / LABELS_FILE).read_text().splitlines()
    assert [json.loads(line)["utt_id"] for line in lines] == ["a", "b"]


def test_torn_last_line_is_truncated_on_open(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with RunState.open(run_dir) as state:
        state.record_selection(0, ["a", "b", "c"], None, "random")
        state.append_labels(0, [_label("a", "happy"), _label("b", "sad")])
    log = run_dir / LABELS_FILE
    intact = log.read_bytes()
    # A crash in the middle of appending c's line.
    with open(log, "ab") as handle:
        handle.write(b'{"annotator":null,"label":"ang')
    problems = check_run_dir(run_dir)
    assert len(problems) == 1 and "line 3" in problems[0] and "torn" in problems[0]
    with caplog.at_level(logging.WARNING, logger="after_ray.store.run_state"):
        state = RunState.open(run_dir)
    try:
        assert "cut off" in caplog.text
        assert log.read_bytes() == intact
        assert sorted(state.labels()) == ["a", "b"]
        assert state.pending_ids(0) == ["c"]
        state.append_labels(0, [_label("c", "angry")])
    finally:
        state.close()
    assert check_run_dir(run_dir) == []
    assert len(log.read_text().splitlines()) == 3


def test_edited_label_log_with_bad_middle_line_refuses_to_open(tmp_path):
    run_dir = tmp_path / "run"
    with RunState.open(run_dir) as state:
        state.record_selection(0, ["a", "b"], None, "random")
        state.append_labels(0, [_label("a", "happy")])
        state.append_labels(0, [_label("b", "sad")])
    log = run_dir / LABELS_FILE
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(RunStateError, match="line 2"):
        RunState.open(run_dir)


def test_open_removes_leftover_temp_files(tmp_path):
    run_dir = tmp_path / "run"
    RunState.open(run_dir).close()
    leftover = run_dir / f".state.json.tmp-{os.getpid()}-abcd1234"
    leftover.write_text("{half")
    RunState.open(run_dir).close()
    assert not leftover.exists()


# --------------------------------------------------------------------------- check


def _clean_run(run_dir: Path) -> None:
    manifest = pa.table({"utt_id": ["a", "b", "c", "d", "e"], "label": ["happy"] * 5})
    with RunState.open(run_dir) as state:
        pq.write_table(manifest, run_dir / "manifest.parquet")
        (run_dir / "ckpt0").mkdir()
        state.mark_stage_done("prepare", {"manifest_path": "manifest.parquet", "n": 5})
        state.record_selection(0, ["a", "b"], None, "after_init")
        state.append_labels(0, [_label("a", "happy"), _label("b", "happy")])
        state.record_checkpoint(0, "ckpt0")
        state.record_metrics(0, {"ua": 0.5})
        state.record_selection(1, ["c"], [0.7], "entropy")
        state.append_labels(1, [_label("c", "happy")])


def _write_selection(run_dir: Path, round_index: int, ids: list[str]) -> None:
    table = pa.table(
        {
            "utt_id": ids,
            "rank": list(range(1, len(ids) + 1)),
            "score": [None] * len(ids),
            "strategy": ["hand"] * len(ids),
        },
        schema=SELECTION_SCHEMA,
    ).replace_schema_metadata({SELECTION_META_KEY: "{}"})
    path = selection_path(run_dir, round_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _append_raw_label(run_dir: Path, utt_id: str, label: str, round_index: int) -> None:
    entry = {"utt_id": utt_id, "label": label, "round": round_index, "source": "human"}
    with open(run_dir / LABELS_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def test_check_clean_run_is_empty(tmp_path):
    _clean_run(tmp_path / "run")
    assert check_run_dir(tmp_path / "run") == []


def test_check_finds_every_kind_of_problem(tmp_path):
    run_dir = tmp_path / "run"
    _clean_run(run_dir)
    # A selected item that was labeled in an earlier round (round 2 re-selects "a").
    _write_selection(run_dir, 2, ["a", "d"])
    # A label for an id the manifest does not have (and no selection contains).
    _append_raw_label(run_dir, "ghost", "happy", 2)
    # A label whose round's selection does not contain it.
    _append_raw_label(run_dir, "e", "happy", 1)
    # Duplicates: identical and conflicting.
    _append_raw_label(run_dir, "d", "happy", 2)
    _append_raw_label(run_dir, "d", "happy", 2)
    _append_raw_label(run_dir, "c", "sad", 1)
    # A damaged middle line, then a torn last line.
    with open(run_dir / LABELS_FILE, "a") as handle:
        handle.write('{"utt_id": "b"}\n{"utt_id": "d", "lab')
    # A file state.json points at is gone; a temp file was left by a killed writer.
    (run_dir / "ckpt0").rmdir()
    (run_dir / "rounds" / "round_001" / f".metrics.json.tmp-{os.getpid()}-00ff").write_text("{")
    # Unreadable metrics.
    (run_dir / "rounds" / "round_002" / "metrics.json").write_text("{not json")

    problems = check_run_dir(run_dir)
    text = "\n".join(problems)

    def has(*needles: str) -> bool:
        return any(all(n in p for n in needles) for p in problems)

    assert has("round_002", "already labeled in an earlier round", "'a'"), text
    assert has("'ghost'", "not in", "manifest.parquet"), text
    assert has("'e'", "round 1", "selection does not contain it"), text
    assert has("'ghost'", "round 2", "selection does not contain it"), text
    assert has("'d'", "identical duplicate"), text
    assert has("'c'", "conflicting label"), text
    assert has("line 9", "field 'label'"), text
    assert has("line 10", "torn"), text
    assert has("checkpoint of round 0", "does not exist"), text
    assert has(".metrics.json.tmp-", "temporary file"), text
    assert has("round_002", "metrics.json", "cannot be read"), text
    assert all("Fix:" in p or "restore" in p for p in problems), text
    assert len(problems) == 11, text


def test_check_reports_a_missing_run_and_missing_state(tmp_path):
    assert "no such directory" in check_run_dir(tmp_path / "absent")[0]
    (tmp_path / "empty").mkdir()
    assert "state.json" in check_run_dir(tmp_path / "empty")[0]


def test_run_directory_names_are_the_ones_old_runs_were_written_with():
    # The on-disk contract: a run directory written before the layout moved into
    # store/layout must still resume, so these names never change.
    from after_ray.store import layout

    assert (
        layout.LOCK_FILE,
        layout.CONFIG_FILE,
        layout.RUN_INFO_FILE,
        layout.STATE_FILE,
        layout.LABELS_FILE,
        layout.MANIFEST_FILE,
        layout.QUARANTINE_FILE,
        layout.EMBED_MODEL_DIR,
        layout.SCORES_DIR,
        layout.LABELING_DIR,
        layout.RAY_STORAGE_DIR,
    ) == (
        "run.lock",
        "config.yaml",
        "run_info.json",
        "state.json",
        "labels.jsonl",
        "manifest.parquet",
        "quarantine.parquet",
        "embed_model",
        "scores",
        "labeling",
        "ray",
    )
    assert str(layout.selection_path("r", 3)) == "r/rounds/round_003/selection.parquet"
    assert str(layout.round_metrics_path("r", 12)) == "r/rounds/round_012/metrics.json"
    assert str(layout.round_model_dir("r", 0)) == "r/rounds/round_000/model"
    assert layout.ROUND_DIR_NAME.match("round_1000")
