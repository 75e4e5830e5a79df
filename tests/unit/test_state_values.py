"""Run state, value by value: the exact bytes and messages ``RunState`` promises.

``test_state.py`` covers the rules (write once, never replace, crash safety); this file pins
the values behind them: the label line format, the lock file, every refusal message's parts,
the log lines of repairs, and what an old or damaged run directory reads back as.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import logging
import math
import os
import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import after_ray.faults as faults
from after_ray.errors import RunStateError
from after_ray.store import atomic, run_state
from after_ray.store.layout import LABELS_FILE, LOCK_FILE, STATE_FILE, selection_path
from after_ray.store.run_state import (
    RunState,
    label_identity,
    read_labels_file,
    validate_label_entry,
)

LOGGER = "after_ray.store.run_state"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def _label(utt_id: str, label: str, **extra) -> dict:
    return {"utt_id": utt_id, "label": label, "source": "simulated", **extra}


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def _enospc(*_args):
    raise OSError(errno.ENOSPC, "No space left on device")


def _lock_text(run_dir: Path, who: str, pid, host) -> str:
    return (
        f"run directory {str(run_dir)!r} is in use by {who}; wait for it to finish or, if that "
        "process is dead, run again: the lock is released by the operating system when its "
        f"holder exits. If it persists on a network filesystem, check with `ps -p {pid}` on "
        f"host {host} and delete run.lock only when no process uses the run"
    )


@pytest.fixture
def held_lock(tmp_path):
    """Hold run.lock through a separate open file (flock conflicts across open files), with
    the holder info the test writes into it."""
    run_dir = tmp_path / "run"
    RunState.open(run_dir).close()
    fds = []

    def hold(content: bytes) -> Path:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
        return run_dir

    yield hold
    for fd in fds:
        os.close(fd)


# --------------------------------------------------------------------------- label validation


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ({"utt_id": 5, "label": "a", "source": "s", "round": 0}, "field 'utt_id'"),
        ({"utt_id": "u", "label": "", "source": "s", "round": 0}, "field 'label'"),
        ({"utt_id": "u", "label": "a", "round": 0}, "field 'source'"),
        ({"utt_id": "u", "label": "a", "source": "s", "round": "0"}, "round"),
        ({"utt_id": "u", "label": "a", "source": "s", "round": True}, "round"),
        ({"utt_id": "u", "label": "a", "source": "s", "round": 0, "votes": "ab"}, "votes"),
        ({"utt_id": "u", "label": "a", "source": "s", "round": 0, "votes": [1]}, "votes"),
        ({"utt_id": "u", "label": "a", "source": "s", "round": 0, "annotator": 7}, "annotator"),
    ],
)
def test_validate_label_entry_names_the_bad_field(entry, reason):
    messages = {
        "not a JSON object": "not a JSON object",
        "field 'utt_id'": "field 'utt_id' is missing or not a non-empty string",
        "field 'label'": "field 'label' is missing or not a non-empty string",
        "field 'source'": "field 'source' is missing or not a non-empty string",
        "round": "field 'round' is missing or not an integer",
        "votes": "field 'votes' must be null or a list of strings",
        "annotator": "field 'annotator' must be null or a string",
    }
    assert validate_label_entry(entry) == messages[reason]


def test_validate_label_entry_accepts_full_and_minimal_entries():
    full = {"utt_id": "u", "label": "a", "source": "s", "round": 3}
    assert validate_label_entry(full) is None
    assert validate_label_entry({**full, "votes": ["a", "b"], "annotator": "anna"}) is None
    assert validate_label_entry({**full, "votes": None, "annotator": None}) is None


def test_label_identity_ignores_time_and_compares_votes_as_a_tuple():
    entry = {"utt_id": "u", "label": "a", "votes": ["a", "b"], "round": 2, "source": "s"}
    assert label_identity({**entry, "time": "t1"}) == ("u", "a", ("a", "b"), 2, "s", None)
    assert label_identity({**entry, "votes": None, "annotator": "x"}) == (
        "u",
        "a",
        None,
        2,
        "s",
        "x",
    )


# --------------------------------------------------------------------------- labels.jsonl reading


def test_read_labels_file_reports_each_bad_line_and_keeps_reading(tmp_path):
    good = {"utt_id": "a", "label": "x", "round": 0, "source": "s"}
    path = tmp_path / LABELS_FILE
    path.write_bytes(
        json.dumps(good).encode()
        + b"\n\n"
        + json.dumps({**good, "utt_id": "b"}).encode()
        + b"\n{oops\n"
        + json.dumps({**good, "utt_id": "c"}).encode()
        + b"\n[1]\n"
    )
    parsed = read_labels_file(path)
    assert [(n, e["utt_id"]) for n, e in parsed.entries] == [(1, "a"), (3, "b"), (5, "c")]
    assert [n for n, _ in parsed.bad_lines] == [2, 4, 6]
    assert parsed.bad_lines[0] == (2, "empty line")
    assert parsed.bad_lines[1][1].startswith("not valid JSON (")
    assert parsed.bad_lines[2] == (6, "not a JSON object")
    assert (parsed.torn_offset, parsed.torn_line, parsed.torn_preview) == (None, None, "")


def test_read_labels_file_previews_80_bytes_of_a_torn_line_with_bad_utf8(tmp_path):
    path = tmp_path / LABELS_FILE
    whole = b'{"utt_id":"a","label":"x","round":0,"source":"s"}\n'
    torn = b'{"label":"\xff' + b"z" * 100
    path.write_bytes(whole + torn)
    parsed = read_labels_file(path)
    assert parsed.torn_offset == len(whole)
    assert parsed.torn_line == 2
    assert parsed.torn_preview == '{"label":"\ufffd' + "z" * 69
    assert [e["utt_id"] for _, e in parsed.entries] == ["a"]


def test_read_labels_file_of_only_a_torn_line(tmp_path):
    path = tmp_path / LABELS_FILE
    path.write_bytes(b'{"utt_id":"a"')
    parsed = read_labels_file(path)
    assert (parsed.entries, parsed.bad_lines) == ([], [])
    assert (parsed.torn_offset, parsed.torn_line, parsed.torn_preview) == (0, 1, '{"utt_id":"a"')


# --------------------------------------------------------------------------- labels on open


def _run_with_labels(run_dir: Path, ids=("a", "b", "c")) -> Path:
    with RunState.open(run_dir) as state:
        state.record_selection(0, list(ids), None, "random")
    return run_dir / LABELS_FILE


def _line(utt_id: str, label: str, time: str = "2024-01-01T00:00:00+00:00") -> str:
    entry = {"utt_id": utt_id, "label": label, "round": 0, "source": "s", "time": time}
    return json.dumps(entry) + "\n"


def test_open_logs_the_torn_line_it_cuts_off(tmp_path, caplog):
    run_dir = tmp_path / "run"
    log = _run_with_labels(run_dir)
    log.write_text(_line("a", "x") + '{"utt_id":"b","lab')
    with caplog.at_level(logging.WARNING, logger=LOGGER), RunState.open(run_dir) as state:
        assert list(state.labels()) == ["a"]
    assert log.read_text() == _line("a", "x")
    assert _messages(caplog, logging.WARNING) == [
        f'{log}: line 2 was cut off by a crash mid-append (\'{{"utt_id":"b","lab\'); '
        "removing it. The caller was never told this label was stored, so the run acquires "
        "it again."
    ]


def test_open_that_cannot_make_the_repair_durable_says_so_and_releases_the_lock(
    tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    log = _run_with_labels(run_dir)
    log.write_text(_line("a", "x") + '{"utt_id":"b"')
    monkeypatch.setattr(run_state.os, "fsync", _enospc)
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(
        f"could not write the repaired label log to {str(log)!r}: No space left on device."
    )
    assert "the disk is full: free some space" in message
    with RunState.open(run_dir) as state:
        assert list(state.labels()) == ["a"]


def test_open_lists_the_first_ten_damaged_lines(tmp_path):
    run_dir = tmp_path / "run"
    log = _run_with_labels(run_dir)
    log.write_text(_line("a", "x") + "\n" + "[1]\n" * 10)
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    details = "; ".join(
        ["line 2: empty line"] + [f"line {n}: not a JSON object" for n in range(3, 12)]
    )
    assert str(info.value) == (
        f"{str(log)!r} has damaged lines ({details}). Only the last line can be torn by a "
        "crash, so this file was edited: fix or delete those lines by hand "
        f"(`after-ray check {run_dir}` lists every problem)"
    )
    assert "line 12" not in str(info.value)


def test_open_keeps_the_first_of_identical_lines_and_logs_the_repeat(tmp_path, caplog):
    run_dir = tmp_path / "run"
    log = _run_with_labels(run_dir)
    first, later = "2024-01-01T00:00:00+00:00", "2024-02-02T00:00:00+00:00"
    log.write_text(_line("a", "x", first) + _line("b", "y") + _line("a", "x", later))
    with caplog.at_level(logging.WARNING, logger=LOGGER), RunState.open(run_dir) as state:
        assert state.labels()["a"]["time"] == first
        assert state.labeled_ids() == ["a", "b"]
    assert _messages(caplog, logging.WARNING) == [
        f"{log} line 3 repeats an identical label; ignoring it"
    ]


def test_open_refuses_a_conflicting_label_line(tmp_path):
    run_dir = tmp_path / "run"
    log = _run_with_labels(run_dir)
    log.write_text(_line("a", "x") + _line("b", "y") + _line("a", "z"))
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    assert str(info.value) == (
        f"{str(log)!r} line 3 labels 'a' as 'z' but an earlier line says 'x': delete the wrong "
        "line by hand, then resume"
    )


# --------------------------------------------------------------------------- appending labels


def test_label_line_format_and_values_read_back(tmp_path):
    run_dir = tmp_path / "run"
    with RunState.open(run_dir) as state:
        state.record_selection(0, ["ü1", "b"], None, "random")
        written = state.append_labels(
            0,
            [
                {
                    "utt_id": "ü1",
                    "label": "ärger",
                    "votes": ["ärger", 3],
                    "round": 0,
                    "source": "human",
                    "annotator": "anna",
                }
            ],
        )
    time = written[0]["time"]
    assert ISO_UTC.match(time), time
    raw = (run_dir / LABELS_FILE).read_bytes()
    line = (
        '{"annotator":"anna","label":"ärger","round":0,"source":"human",'
        f'"time":"{time}","utt_id":"ü1","votes":["ärger","3"]}}\n'
    )
    assert raw == line.encode()
    with RunState.open(run_dir) as state:
        assert state.labels() == {
            "ü1": {
                "annotator": "anna",
                "label": "ärger",
                "round": 0,
                "source": "human",
                "time": time,
                "utt_id": "ü1",
                "votes": ["ärger", "3"],
            }
        }
        assert written == list(state.labels().values())


def test_label_refusals_name_item_round_and_labels(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b"], None, "random")
        state.append_labels(0, [_label("a", "happy")])
        with pytest.raises(RunStateError) as info:
            state.append_labels(0, [_label("a", "sad", source="human")])
        assert str(info.value) == (
            "'a' is already labeled 'happy' (round 0, source 'simulated'); refusing to add "
            "'sad' (round 0, source 'human'). Labels are never replaced"
        )
        with pytest.raises(RunStateError) as info:
            state.append_labels(0, [_label("zz", "sad")])
        assert str(info.value) == (
            "round 0: 'zz' is not in this round's selection; only selected items can be labeled"
        )
        with pytest.raises(RunStateError) as info:
            state.append_labels(4, [_label("a", "sad")])
        assert str(info.value) == (
            "round 4 has no selection: record it before appending its labels"
        )


def test_label_row_round_must_match_and_fields_must_be_valid(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(1, ["a", "b"], None, "random")
        with pytest.raises(ValueError) as info:
            state.append_labels(1, [_label("a", "happy", round=0)])
        assert str(info.value) == "label row for 'a' says round 0, appended to round 1"
        row = {"utt_id": "b", "source": "simulated"}
        with pytest.raises(ValueError) as info:
            state.append_labels(1, [row])
        assert str(info.value) == (
            f"label row {row!r}: field 'label' is missing or not a non-empty string"
        )
        assert state.append_labels(1, [_label("a", "happy", round=1)])[0]["round"] == 1
        assert state.labeled_round() == {"a": 1}
        assert (tmp_path / "run" / LABELS_FILE).read_text().count("\n") == 1


def test_failed_label_append_leaves_the_log_as_it_was(tmp_path, monkeypatch, caplog):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b", "c"], None, "random")
        log = state.run_dir / LABELS_FILE
        # The first append creates the log: a failure removes it again.
        monkeypatch.setattr(run_state.os, "fsync", _enospc)
        with pytest.raises(RunStateError) as info:
            state.append_labels(0, [_label("a", "happy")])
        assert str(info.value).startswith(
            f"could not write 1 labels to {str(log)!r}: No space left on device."
        )
        assert not log.exists()
        monkeypatch.undo()
        state.append_labels(0, [_label("a", "happy")])
        before = log.read_bytes()
        # A later append: cut back to the bytes before it.
        monkeypatch.setattr(run_state.os, "fsync", _enospc)
        with caplog.at_level(logging.ERROR, logger=LOGGER), pytest.raises(RunStateError) as info:
            state.append_labels(0, [_label("b", "sad"), _label("c", "sad")])
        assert "could not write 2 labels to" in str(info.value)
        assert "the disk is full" in str(info.value)
        monkeypatch.undo()
        assert log.read_bytes() == before
        assert _messages(caplog, logging.ERROR) == []
        assert list(state.labels()) == ["a"]
    with RunState.open(tmp_path / "run") as state:
        assert list(state.labels()) == ["a"]


def test_label_log_that_cannot_be_opened_is_not_created(tmp_path, monkeypatch, caplog):
    real_open = builtins.open

    def no_append(file, mode="r", *args, **kwargs):
        if mode == "ab":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(file, mode, *args, **kwargs)

    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a"], None, "random")
        monkeypatch.setattr(run_state, "open", no_append, raising=False)
        with caplog.at_level(logging.ERROR, logger=LOGGER), pytest.raises(RunStateError) as info:
            state.append_labels(0, [_label("a", "happy")])
        monkeypatch.undo()
        assert "Disk quota exceeded" in str(info.value)
        assert not (state.run_dir / LABELS_FILE).exists()
        # Nothing to undo: no "could not undo" error for a file that never existed.
        assert _messages(caplog, logging.ERROR) == []


def test_failed_cut_back_is_logged(tmp_path, monkeypatch, caplog):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b"], None, "random")
        state.append_labels(0, [_label("a", "happy")])
        log = state.run_dir / LABELS_FILE
        monkeypatch.setattr(run_state.os, "fsync", _enospc)

        def eio(*_args):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(run_state.os, "truncate", eio)
        with caplog.at_level(logging.ERROR, logger=LOGGER), pytest.raises(RunStateError):
            state.append_labels(0, [_label("b", "sad")])
        monkeypatch.undo()
    assert _messages(caplog, logging.ERROR) == [
        f"could not undo a failed append to {log} ([Errno 5] Input/output error)"
    ]


class _PowerCut(Exception):
    pass


def test_power_cut_mid_append_leaves_half_the_batch_then_open_cuts_it(tmp_path, monkeypatch):
    """The ``label_append`` failpoint writes the first half of the batch's bytes, then dies."""
    run_dir = tmp_path / "run"
    votes = ["neutral"] * 12
    with RunState.open(run_dir) as state:
        state.record_selection(0, ["a", "b"], None, "random")
        state.append_labels(0, [_label("a", "happy")])
        log = run_dir / LABELS_FILE
        before = log.read_bytes()

        def die(pid, sig):
            raise _PowerCut

        monkeypatch.setenv(faults.ENV, "label_append")
        monkeypatch.setattr(faults.os, "kill", die)
        with pytest.raises(_PowerCut):
            state.append_labels(0, [_label("b", "sad", votes=votes)])
        monkeypatch.undo()
    torn = log.read_bytes()[len(before) :]
    time = re.search(rb'"time":"([^"]+)"', torn).group(1).decode()
    line = (
        '{"annotator":null,"label":"sad","round":0,"source":"simulated",'
        f'"time":"{time}","utt_id":"b","votes":{json.dumps(votes, separators=(",", ":"))}}}\n'
    ).encode()
    assert torn == line[: len(line) // 2]
    with RunState.open(run_dir) as state:
        assert log.read_bytes() == before
        assert state.pending_ids(0) == ["b"]


# --------------------------------------------------------------------------- selections


def test_selection_file_schema_scores_and_metadata(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        path = state.record_selection(
            0,
            ["c", "a", "b", "d", "e"],
            [1, None, float("nan"), float("inf"), 2.5],
            "entropy",
            {"k": 2},
        )
        info = state.selection_info(0)
        assert ISO_UTC.match(info["created"]), info
        assert info == {
            "round": 0,
            "strategy": "entropy",
            "extra": {"k": 2},
            "created": info["created"],
        }
        assert state.selection_info(7) is None
        random_path = state.record_selection(1, ["f", "g"], None, "random")
    table = pq.read_table(path)
    assert [(f.name, str(f.type), f.nullable) for f in table.schema] == [
        ("utt_id", "string", False),
        ("rank", "int32", False),
        ("score", "double", True),
        ("strategy", "string", False),
    ]
    assert pq.read_table(random_path).schema.field("score").type == pa.float64()
    assert table.column("score").to_pylist() == [1.0, None, None, None, 2.5]
    assert table.column("strategy").to_pylist() == ["entropy"] * 5
    created = info["created"]
    assert (
        table.schema.metadata[b"after_ray.selection"]
        == (
            f'{{"created": "{created}", "extra": {{"k": 2}}, "round": 0, "strategy": "entropy"}}'
        ).encode()
    )


def test_selection_refusals_name_what_is_wrong(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        with pytest.raises(ValueError) as info:
            state.record_selection(3, [], None, "random")
        assert str(info.value) == "round 3: an empty selection cannot be recorded"
        ids = ["a", "b", "b", "c", "c", "c"] + [f"d{i}" for i in range(5) for _ in range(2)]
        with pytest.raises(ValueError) as info:
            state.record_selection(1, ids, None, "random")
        assert (
            str(info.value) == "round 1: the selection repeats utt_ids ['b', 'c', 'd0', 'd1', 'd2']"
        )
        with pytest.raises(ValueError) as info:
            state.record_selection(1, ["a", "b"])
        assert str(info.value) == "record_selection needs the strategy's name"
        with pytest.raises(ValueError) as info:
            state.record_selection(1, ["a"], [1.0, 2.0], "entropy")
        assert str(info.value) == "round 1: 2 scores for 1 selected utt_ids"

        state.record_selection(0, ["a", "b"], None, "random")
        with pytest.raises(RunStateError) as info:
            state.record_selection(0, ["a", "b", "c"], None, "entropy")
        assert str(info.value) == (
            "round 0 already has a selection (2 items by 'random') that differs from the new "
            "one (3 items by 'entropy'); a recorded selection is never replaced. Resume from "
            f"it, or remove {str(state.round_dir(0))!r} by hand if it was never labeled"
        )


def test_selecting_labeled_items_names_them_and_their_rounds(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a", "b", "c"], None, "random")
        state.record_selection(1, ["d", "e", "f", "g"], None, "random")
        state.append_labels(0, [_label(u, "x") for u in "abc"])
        state.append_labels(1, [_label(u, "x") for u in "defg"])
        with pytest.raises(RunStateError) as info:
            state.record_selection(2, ["g", "a", "z", "b", "c", "d", "e"], None, "entropy")
        assert str(info.value) == (
            "round 2: the selection contains 6 items that are already labeled (in rounds "
            "[0, 1]), e.g. ['g', 'a', 'b', 'c', 'd']; the strategy must exclude labeled items"
        )


def test_replayed_selection_warns_only_when_scores_differ(tmp_path, caplog):
    with RunState.open(tmp_path / "run") as state:
        path = state.record_selection(0, ["a", "b"], [0.5, None], "entropy")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert state.record_selection(0, ["a", "b"], [0.5, None], "entropy") == path
            assert _messages(caplog, logging.WARNING) == []
            state.record_selection(0, ["a", "b"], [0.7, None], "entropy")
        assert _messages(caplog, logging.WARNING) == [
            "round 0: re-recorded the same selection with different scores; keeping the first ones"
        ]
        assert pq.read_table(path).column("score").to_pylist() == [0.5, None]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ([1.0], [1.0, 2.0], False),
        ([1.0, 2.0], [1.0], False),
        ([], [], True),
        ([None, 1.0], [None, 1.0], True),
        ([None], [1.0], False),
        ([1.0], [None], False),
        ([1.0], [1.0000005], True),
        ([1.0], [1.00001], False),
        ([0.0], [1e-10], True),
        ([0.0], [1e-8], False),
        ([1.0, 0.0], [1.0, 0.5], False),
        ([1.0], [2.0], False),
    ],
)
def test_same_scores_tolerance(a, b, same):
    assert run_state._same_scores(a, b) is same


def test_unreadable_or_foreign_selection_files_are_refused(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        path = selection_path(state.run_dir, 2)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not parquet at all")
        with pytest.raises(RunStateError) as info:
            state.selection(2)
        message = str(info.value)
        assert message.startswith(f"selection of round 2 at {str(path)!r} cannot be read (")
        assert message.endswith(
            "); it was written atomically, so it was changed by something else: restore it "
            "from a backup or remove the round directory and re-run that round"
        )
        pq.write_table(pa.table({"utt_id": ["a"]}), path)
        with pytest.raises(RunStateError) as info:
            state.selection(2)
        assert str(info.value) == (
            f"selection of round 2 at {str(path)!r} lacks columns ['rank', 'score', "
            "'strategy']: it was not written by after-ray; remove the round directory and "
            "re-run that round"
        )


def test_selection_without_metadata_and_odd_round_entries(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, ["a"], None, "random")
        table = pa.table(
            {"utt_id": ["b", "c"], "rank": [2, 1], "score": [None, None], "strategy": ["h", "h"]}
        )
        path = selection_path(state.run_dir, 3)
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
        rounds = state.run_dir / "rounds"
        (rounds / "round_007").write_text("a file, not a round")
        (rounds / "notes").mkdir()
        (rounds / "round_004").mkdir()
        assert state.rounds() == [0, 3, 4]
        assert state.selection_info(3) == {}
        assert state.selection(3) == ["c", "b"]
        assert state.selected_ids() == {"a", "b", "c"}
        status = state.round_status(3)
        assert (status.round, status.n_selected, status.n_labeled) == (3, 2, 0)


def test_selection_write_failure_names_the_round(tmp_path, monkeypatch):
    with RunState.open(tmp_path / "run") as state:
        monkeypatch.setattr(atomic.os, "fsync", _enospc)
        with pytest.raises(RunStateError) as info:
            state.record_selection(3, ["a"], None, "random")
        monkeypatch.undo()
        assert str(info.value).startswith(
            f"could not write the selection of round 3 to {str(selection_path(state.run_dir, 3))!r}"
        )
        assert state.selection(3) is None


# --------------------------------------------------------------------------- state.json


def test_fresh_state_file_holds_the_documented_fields(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        assert state.experiment() is None
        assert state.stages_done() == []
    raw = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert ISO_UTC.match(raw["created"]), raw
    assert raw == {
        "schema_version": 1,
        "created": raw["created"],
        "experiment": None,
        "stages": {},
        "checkpoints": {},
        "timings": [],
    }


def test_old_state_file_gets_the_missing_fields(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STATE_FILE).write_text('{"schema_version": 1}')
    with RunState.open(run_dir, create=False) as state:
        assert state.stages_done() == []
        assert state.checkpoint(0) is None
        assert state.timings() == []
        assert state.experiment() is None
        state.record_checkpoint(0, "ckpt")
    assert json.loads((run_dir / STATE_FILE).read_text()) == {
        "schema_version": 1,
        "stages": {},
        "checkpoints": {"0": "ckpt"},
        "timings": [],
        "experiment": None,
    }


def test_foreign_or_newer_state_files_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / STATE_FILE
    for content in ('{"version": 1}', "[1, 2]", '{"schema_version": "1"}'):
        path.write_text(content)
        with pytest.raises(RunStateError) as info:
            RunState.open(run_dir)
        assert str(info.value) == (
            f"{str(path)!r} is not an after-ray run state (no schema_version): check the path"
        )
    path.write_text('{"schema_version": 2}')
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    assert str(info.value) == (
        f"{str(path)!r} has schema version 2, newer than this after-ray understands (1): "
        "upgrade after-ray to resume this run"
    )
    path.write_text("{half")
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    assert str(info.value).endswith(
        "; it is written atomically, so it was changed by something else: restore it or delete "
        "it and re-run the step that writes it"
    )
    assert str(info.value).startswith(f"{str(path)!r} cannot be read (")


def test_failed_state_write_changes_nothing(tmp_path, monkeypatch):
    with RunState.open(tmp_path / "run") as state:
        state.mark_stage_done("prepare", {"n": 1})
        monkeypatch.setattr(atomic.os, "fsync", _enospc)
        with pytest.raises(RunStateError) as info:
            state.record_checkpoint(0, "ckpt")
        assert str(info.value).startswith(
            f"could not write the run state to {str(state.run_dir / STATE_FILE)!r}"
        )
        with pytest.raises(RunStateError):
            state.mark_stage_done("prepare", {"n": 2})
        with pytest.raises(RunStateError):
            state.record_timing(0, "train", 1.0)
        monkeypatch.undo()
        assert state.checkpoint(0) is None
        assert state.stage_info("prepare")["n"] == 1
        assert state.timings() == []


def test_stages_log_a_redo_and_record_when_they_finished(tmp_path, caplog):
    with RunState.open(tmp_path / "run") as state, caplog.at_level(logging.INFO, logger=LOGGER):
        state.mark_stage_done("prepare", {"n": 1})
        state.mark_stage_done("tapt")
        assert _messages(caplog, logging.INFO) == []
        state.mark_stage_done("prepare", {"n": 2})
        assert _messages(caplog, logging.INFO) == [
            "stage 'prepare' was already done; recording the new result"
        ]
        info = state.stage_info("prepare")
        assert ISO_UTC.match(info["done_at"]), info
        assert info == {"n": 2, "done_at": info["done_at"]}
        assert state.stages_done() == ["prepare", "tapt"]


def test_experiment_identity_is_stored_and_any_difference_refused(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.ensure_experiment({"corpus": "synth", "seed": 0})
        assert state.experiment() == {"corpus": "synth", "seed": 0}
        with pytest.raises(RunStateError) as info:
            state.ensure_experiment({"corpus": "synth", "seed": 1, "budget": 10})
        assert str(info.value) == (
            f"run directory {str(state.run_dir)!r} belongs to a different experiment (budget: "
            "run has None, now 10, seed: run has 0, now 1); use the original settings to resume "
            "it, or a new run.name"
        )
        with pytest.raises(RunStateError, match="budget: run has None, now 10"):
            state.ensure_experiment({"corpus": "synth", "seed": 0, "budget": 10})


def test_timings_values_and_refusals(tmp_path):
    with RunState.open(tmp_path / "run") as state:
        state.record_timing(2, "score", 0)
        state.record_timing(None, "tapt", 3)
        timings = state.timings()
        assert all(ISO_UTC.match(t["at"]) for t in timings), timings
        assert [{k: v for k, v in t.items() if k != "at"} for t in timings] == [
            {"round": 2, "stage": "score", "seconds": 0.0},
            {"round": None, "stage": "tapt", "seconds": 3.0},
        ]
        for bad in (-0.5, math.nan, math.inf):
            with pytest.raises(ValueError) as info:
                state.record_timing(0, "train", bad)
            assert str(info.value) == (
                f"timing of 'train': seconds must be finite and >= 0, got {bad}"
            )
        for bad in (-1, True, "1"):
            with pytest.raises(ValueError) as info:
                state.record_metrics(bad, {})
            assert str(info.value) == f"round must be an integer >= 0, got {bad!r}"
        assert len(state.timings()) == 2


# --------------------------------------------------------------------------- open, close, repr


def test_open_messages_and_nested_creation(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RunStateError) as info:
        RunState.open(missing, create=False)
    assert str(info.value) == (
        f"run directory {str(missing)!r} does not exist: check the path, or start the run first"
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RunStateError) as info:
        RunState.open(plain, create=False)
    assert str(info.value) == (
        f"{str(plain)!r} is not a run directory (no state.json): check the path"
    )
    (tmp_path / "file").write_text("")
    under_file = tmp_path / "file" / "run"
    with pytest.raises(RunStateError) as info:
        RunState.open(under_file)
    assert str(info.value) == f"cannot create run directory {str(under_file)!r}: Not a directory"
    nested = tmp_path / "a" / "b" / "run"
    RunState.open(nested).close()
    assert (nested / STATE_FILE).exists()


def test_open_of_a_directory_created_concurrently(tmp_path, monkeypatch):
    # Another process creates the run directory between the existence check and mkdir.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_is_dir = Path.is_dir
    seen = []

    def racing_is_dir(self):
        if self == run_dir and not seen:
            seen.append(self)
            return False
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", racing_is_dir)
    RunState.open(run_dir).close()
    monkeypatch.undo()
    assert seen == [run_dir]
    assert (run_dir / STATE_FILE).exists()


def test_repr_and_closed_refusal(tmp_path):
    run_dir = tmp_path / "run"
    state = RunState.open(run_dir)
    assert repr(state) == f"RunState({str(run_dir)!r})"
    state.close()
    assert repr(state) == f"RunState({str(run_dir)!r}, closed)"
    with pytest.raises(RunStateError) as info:
        state.record_checkpoint(0, "x")
    assert str(info.value) == (
        f"the RunState of {str(run_dir)!r} is closed: open it again to write"
    )


def test_open_removes_temp_files_and_restores_moved_aside_dirs_with_log_lines(
    tmp_path, caplog, monkeypatch
):
    run_dir = tmp_path / "run"
    RunState.open(run_dir).close()
    temp = run_dir / f".state.json.tmp-{os.getpid()}-abcd1234"
    temp.write_text("{half")
    stuck = run_dir / f".config.yaml.tmp-{os.getpid()}-00ff"
    stuck.write_text("{")
    aside = run_dir / ".embed_model.old-123"
    aside.mkdir()
    (aside / "weights").write_text("w")
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self == stuck:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        RunState.open(run_dir).close()
    monkeypatch.undo()
    assert not temp.exists()
    assert stuck.exists()  # it could not be removed; the open still works
    assert (run_dir / "embed_model" / "weights").read_text() == "w"
    assert sorted(_messages(caplog, logging.INFO)) == sorted(
        [
            f"removing {stuck}, left by an interrupted write",
            f"removing {temp}, left by an interrupted write",
            f"restored {run_dir / 'embed_model'}, moved aside by an interrupted directory swap",
        ]
    )


# --------------------------------------------------------------------------- the lock


def test_lock_file_records_the_holder_and_is_emptied_on_close(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("x" * 500)  # a long stale holder record
    old_umask = os.umask(0o022)
    try:
        state = RunState.open(run_dir)
    finally:
        os.umask(old_umask)
    lock = run_dir / LOCK_FILE
    info = json.loads(lock.read_text())
    assert lock.read_text().endswith("}\n")
    assert set(info) == {"pid", "host", "since"}
    assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
    assert ISO_UTC.match(info["since"]), info
    state.close()
    assert lock.read_bytes() == b""


def test_new_lock_file_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        RunState.open(tmp_path / "run").close()
    finally:
        os.umask(old_umask)
    assert (tmp_path / "run" / LOCK_FILE).stat().st_mode & 0o777 == 0o644


def test_second_open_in_this_process_gets_the_full_message(tmp_path):
    run_dir = tmp_path / "run"
    with RunState.open(run_dir):
        info = json.loads((run_dir / LOCK_FILE).read_text())
        with pytest.raises(RunStateError) as refused:
            RunState.open(run_dir)
    pid, host, since = info["pid"], info["host"], info["since"]
    who = (
        f"pid {pid} on host {host} since {since} (this very process: close the other RunState "
        "of this directory first)"
    )
    assert str(refused.value) == _lock_text(run_dir, who, pid, host)


def test_lock_held_by_another_pid_on_this_host(held_lock):
    host = socket.gethostname()
    run_dir = held_lock(json.dumps({"pid": 1, "host": host, "since": "then"}).encode())
    with pytest.raises(RunStateError) as refused:
        RunState.open(run_dir)
    assert str(refused.value) == _lock_text(run_dir, f"pid 1 on host {host} since then", 1, host)


def test_lock_held_by_this_pid_number_on_another_host(held_lock):
    pid = os.getpid()
    run_dir = held_lock(json.dumps({"pid": pid, "host": "elsewhere", "since": "t"}).encode())
    with pytest.raises(RunStateError) as refused:
        RunState.open(run_dir)
    assert str(refused.value) == _lock_text(
        run_dir, f"pid {pid} on host elsewhere since t", pid, "elsewhere"
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[1, 2]",
        b"{half",
        # One byte longer than the 4096 bytes read back: treated as unreadable.
        json.dumps({"pid": 1, "host": "h" * 4061, "since": "t"}).encode(),
    ],
)
def test_lock_held_without_readable_holder_info(held_lock, content):
    run_dir = held_lock(content)
    with pytest.raises(RunStateError) as refused:
        RunState.open(run_dir)
    who = "another process (it has not written its pid yet)"
    assert str(refused.value) == _lock_text(run_dir, who, None, None)


def test_lock_holder_info_exactly_4096_bytes_is_read(held_lock):
    info = {"pid": 1, "host": "", "since": "t"}
    info["host"] = "h" * (4096 - len(json.dumps(info)))
    content = json.dumps(info).encode()
    assert len(content) == 4096
    run_dir = held_lock(content)
    with pytest.raises(RunStateError) as refused:
        RunState.open(run_dir)
    host = info["host"]
    assert str(refused.value) == _lock_text(run_dir, f"pid 1 on host {host} since t", 1, host)


def test_lock_file_that_cannot_be_created(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    assert str(info.value) == (
        f"cannot create the lock file {str(run_dir / LOCK_FILE)!r}: Is a directory; the run "
        "directory must be writable"
    )


def test_filesystem_without_flock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_state.fcntl, "flock", no_locks)
    with pytest.raises(RunStateError) as info:
        RunState.open(run_dir)
    monkeypatch.undo()
    assert str(info.value) == (
        f"cannot lock {str(run_dir / LOCK_FILE)!r}: No locks available; the filesystem must "
        "support flock (on NFS, mount with lock support)"
    )
    RunState.open(run_dir).close()


def test_holder_info_that_cannot_be_written_only_warns(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(run_state.os, "pwrite", _enospc)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state = RunState.open(run_dir)
    monkeypatch.undo()
    try:
        with pytest.raises(RunStateError, match="another process"):
            RunState.open(run_dir)
    finally:
        state.close()
    assert _messages(caplog, logging.WARNING) == [
        f"could not record the lock holder in {run_dir / LOCK_FILE} ([Errno 28] No space left "
        "on device)"
    ]


def test_json_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    import locale

    with RunState.open(tmp_path / "run") as state:
        state.record_metrics(0, {"ua": 0.5})
        path = state.round_dir(0) / "metrics.json"
        path.write_bytes('{"note": "ärger"}'.encode())
        old = locale.setlocale(locale.LC_CTYPE)
        locale.setlocale(locale.LC_CTYPE, "C")
        try:
            assert state.metrics(0) == {"note": "ärger"}
        finally:
            locale.setlocale(locale.LC_CTYPE, old)
