"""The disk fills up (or a write fails some other way) while the run state or a checkpoint is
being written: the previous state must stay valid and the user must be told so. And a checkpoint
damaged on disk (missing, truncated, overwritten) is reported as such, naming what to delete.

Simulated: ``open`` of the writing module is replaced by one whose files take ``room`` more bytes
and then fail with ENOSPC after writing what fitted (a real short write), and ``os.fsync`` /
``os.pwrite`` failures. Real: a subprocess under ``RLIMIT_FSIZE`` gets genuine short writes and
EFBIG from the kernel (no root or loop device needed).

After every failure: the error is a ``RunStateError`` that says what failed and that the previous
state is intact; the files are byte-identical; ``RunState.open`` works; ``check_run_dir`` finds
nothing; and retrying once there is room again gives the same result as if nothing had happened.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

import after_ray.store.run_state as state_module
from after_ray.errors import RunStateError
from after_ray.store import atomic, layout
from after_ray.store.check import check_run_dir
from after_ray.store.layout import LABELS_FILE, STATE_FILE
from after_ray.store.run_state import RunState

IDS0 = [f"c/s{i % 3}/u{i:03d}" for i in range(6)]
IDS1 = [f"c/s{i % 3}/v{i:03d}" for i in range(6)]
CLASSES = ["neutral", "happy", "angry", "sad"]


class _Disk:
    """Bytes left on the simulated disk, shared by every file opened through it."""

    def __init__(self, room: int) -> None:
        self.room = room

    def open(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if not any(flag in mode for flag in "wax+"):
            return handle
        return _FillingFile(handle, self)


class _FillingFile:
    def __init__(self, real, disk: _Disk) -> None:
        self._real = real
        self._disk = disk

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) <= self._disk.room:
            self._disk.room -= len(data)
            return self._real.write(data)
        if self._disk.room:
            self._real.write(data[: self._disk.room])
            self._real.flush()
            self._disk.room = 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._real.close()


def _fill_disk(monkeypatch, room: int) -> _Disk:
    disk = _Disk(room)
    for module in (atomic, state_module):
        monkeypatch.setattr(module, "open", disk.open, raising=False)
    return disk


def _assert_disk_full_message(exc: RunStateError, path: Path, what: str) -> None:
    message = str(exc)
    assert what in message and str(path) in message, message
    assert "disk is full" in message, message
    assert "untouched" in message and "still valid" in message, message
    cause = exc.__cause__
    assert isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG)


def _temp_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if atomic.is_temp_file(p.name)]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run except the lock (whose content is the holder's pid)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != layout.LOCK_FILE
    }


def _labels(ids, label="happy", source="human"):
    return [{"utt_id": u, "label": label, "source": source} for u in ids]


@pytest.fixture
def run(tmp_path):
    """A run with round 0 selected and labeled, round 1 selected, a checkpoint recorded."""
    run_dir = tmp_path / "run"
    with RunState.open(run_dir) as state:
        state.ensure_experiment({"corpus": "synth", "seed": 0})
        state.record_selection(0, IDS0, None, "after_init")
        state.append_labels(0, _labels(IDS0, "neutral", "simulated"))
        state.record_checkpoint(0, "rounds/round_000/model")
        (run_dir / "rounds/round_000/model").mkdir()
        state.record_selection(1, IDS1, [float(i) for i in range(6)], "after")
    return run_dir


def _assert_state_valid(run_dir: Path, before: dict[str, bytes]) -> None:
    assert check_run_dir(run_dir) == []
    assert _snapshot(run_dir) == before
    with RunState.open(run_dir, create=False) as state:
        assert state.selection(0) == IDS0 and state.selection(1) == IDS1
        assert set(state.labels()) == set(IDS0)
        assert state.checkpoint(0) == "rounds/round_000/model"


# --------------------------------------------------------------------------- atomic writes

WRITERS = {
    "bytes": lambda path: atomic.atomic_write_bytes(path, b"n" * 3000, what="the blob"),
    "text": lambda path: atomic.atomic_write_text(path, "ü" * 1500, what="the blob"),
    "json": lambda path: atomic.atomic_write_json(path, {"k": list(range(600))}, what="the blob"),
    "parquet": lambda path: atomic.atomic_write_parquet(
        pa.table({"a": list(range(2000))}), path, what="the blob"
    ),
}


@pytest.mark.parametrize("room", [0, 1, 37, 900])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, kind, room):
    target = tmp_path / f"file.{kind}"
    atomic.atomic_write_bytes(target, b"previous version\n")
    _fill_disk(monkeypatch, room)
    with pytest.raises(RunStateError) as info:
        WRITERS[kind](target)
    _assert_disk_full_message(info.value, target, "the blob")
    assert target.read_bytes() == b"previous version\n"
    assert _temp_leftovers(tmp_path) == []
    monkeypatch.undo()
    WRITERS[kind](target)  # room again: the same call works
    assert target.read_bytes() != b"previous version\n"


# --------------------------------------------------------------------------- labels.jsonl


def _label_line_length(run_dir: Path, utt_id: str) -> int:
    """Bytes of the label line ``utt_id`` would get (time stamps have a fixed width)."""
    entry = state_module._label_entry(_labels([utt_id])[0], 1, state_module.now_iso())
    return len(json.dumps(entry, sort_keys=True, ensure_ascii=False, separators=(",", ":"))) + 1


@pytest.mark.parametrize("room", ["none", "partial", "one_line", "all_but_one_byte"])
def test_append_labels_on_a_full_disk_leaves_the_log_byte_identical(run, monkeypatch, room):
    line = _label_line_length(run, IDS1[0])
    bytes_left = {"none": 0, "partial": 25, "one_line": line + 3, "all_but_one_byte": 6 * line - 1}
    before = _snapshot(run)
    with RunState.open(run) as state:
        _fill_disk(monkeypatch, bytes_left[room])
        with pytest.raises(RunStateError) as info:
            state.append_labels(1, _labels(IDS1))
        _assert_disk_full_message(info.value, run / LABELS_FILE, "6 labels")
        # Nothing of the batch counts as stored: not on disk, not in this object.
        assert (run / LABELS_FILE).read_bytes() == before[LABELS_FILE]
        assert state.pending_ids(1) == IDS1
        assert check_run_dir(run) == []
        monkeypatch.undo()
    _assert_state_valid(run, before)
    # With room again, the retry stores every label exactly once.
    with RunState.open(run) as state:
        assert len(state.append_labels(1, _labels(IDS1))) == 6
    assert check_run_dir(run) == []
    lines = (run / LABELS_FILE).read_text().splitlines()
    assert len(lines) == 12 and len({json.loads(x)["utt_id"] for x in lines}) == 12


def test_append_labels_with_a_failing_fsync_keeps_the_log(run, monkeypatch):
    # Delayed allocation (ext4, NFS) reports ENOSPC at fsync, after write() succeeded.
    before = _snapshot(run)
    with RunState.open(run) as state:
        monkeypatch.setattr(
            state_module.os, "fsync", _raise(OSError(errno.ENOSPC, "No space left on device"))
        )
        with pytest.raises(RunStateError) as info:
            state.append_labels(1, _labels(IDS1[:2]))
        monkeypatch.undo()
        _assert_disk_full_message(info.value, run / LABELS_FILE, "2 labels")
        assert state.pending_ids(1) == IDS1
    _assert_state_valid(run, before)


def test_first_labels_of_a_run_on_a_full_disk_leave_no_log(tmp_path, monkeypatch):
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, IDS0, None, "random")
        _fill_disk(monkeypatch, 40)
        with pytest.raises(RunStateError, match="disk is full"):
            state.append_labels(0, _labels(IDS0))
        monkeypatch.undo()
    assert not (tmp_path / "run" / LABELS_FILE).exists()
    assert check_run_dir(tmp_path / "run") == []


# --------------------------------------------------------------------------- selection, state.json


@pytest.mark.parametrize("room", [0, 200])
def test_record_selection_on_a_full_disk_records_nothing(run, monkeypatch, room):
    before = _snapshot(run)
    with RunState.open(run) as state:
        _fill_disk(monkeypatch, room)
        with pytest.raises(RunStateError) as info:
            state.record_selection(2, [f"c/new/{i}" for i in range(50)], None, "coreset")
        monkeypatch.undo()
        _assert_disk_full_message(
            info.value, state_module.selection_path(run, 2), "the selection of round 2"
        )
        assert state.selection(2) is None
    _assert_state_valid(run, before)
    with RunState.open(run) as state:  # the retry writes it
        state.record_selection(2, [f"c/new/{i}" for i in range(50)], None, "coreset")
        assert len(state.selection(2)) == 50
    assert check_run_dir(run) == []


STATE_CHANGES = {
    "checkpoint": lambda s: s.record_checkpoint(1, "rounds/round_001/model"),
    "stage": lambda s: s.mark_stage_done("tapt", {"backbone_dir": "tapt/backbone"}),
    "timing": lambda s: s.record_timing(1, "select", 1.5),
}


@pytest.mark.parametrize("change", sorted(STATE_CHANGES))
def test_failed_state_write_is_not_persisted_by_a_later_write(run, monkeypatch, change):
    """The caller was told the change failed, so no later write may store it after all."""
    before = _snapshot(run)
    with RunState.open(run) as state:
        remembered = (state.checkpoint(1), state.stage_info("tapt"), state.timings())
        _fill_disk(monkeypatch, 10)
        with pytest.raises(RunStateError) as info:
            STATE_CHANGES[change](state)
        monkeypatch.undo()
        _assert_disk_full_message(info.value, run / STATE_FILE, "the run state")
        assert (state.checkpoint(1), state.stage_info("tapt"), state.timings()) == remembered
        assert _snapshot(run) == before
        state.record_timing(0, "report", 0.25)  # a later write that succeeds
    with RunState.open(run) as state:
        assert state.checkpoint(1) is None and state.stage_info("tapt") is None
        assert [t["stage"] for t in state.timings()] == ["report"]


def test_open_works_when_the_lock_info_cannot_be_written(run, monkeypatch):
    """A full disk must not keep a user from opening (and inspecting) an existing run."""
    before = _snapshot(run)
    monkeypatch.setattr(
        state_module.os, "pwrite", _raise(OSError(errno.ENOSPC, "No space left on device"))
    )
    with RunState.open(run, create=False) as state:
        assert set(state.labels()) == set(IDS0)
    # The lock was released on close (no leaked descriptor still holding it).
    with RunState.open(run, create=False) as state:
        assert state.selection(1) == IDS1
    monkeypatch.undo()
    _assert_state_valid(run, before)


def test_new_run_on_a_full_disk_fails_clearly_and_leaves_no_lock_held(tmp_path, monkeypatch):
    _fill_disk(monkeypatch, 5)
    with pytest.raises(RunStateError, match="disk is full"):
        RunState.open(tmp_path / "run")
    monkeypatch.undo()
    with RunState.open(tmp_path / "run") as state:  # not "in use by this very process"
        assert state.labels() == {}
    assert check_run_dir(tmp_path / "run") == []


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(directory: Path, version: str) -> None:
    (directory / "weights.bin").write_bytes(version.encode() * 1000)
    (directory / "config.json").write_text(json.dumps({"version": version}))


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "rounds" / "model"
    with atomic.staged_directory(out) as staging:
        _checkpoint(staging, "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunStateError) as info:
        with atomic.staged_directory(out, what="the round 1 model") as staging:
            (staging / "weights.bin").write_bytes(b"2" * 500)
            raise OSError(errno.ENOSPC, "No space left on device")
    _assert_disk_full_message(info.value, out, "the round 1 model")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []  # no staging or moved-aside directory left behind


def test_checkpoint_write_failing_inside_a_rust_writer_is_reported_as_disk_full(tmp_path):
    # safetensors reports I/O errors as SafetensorError("... (os error 28)"), not OSError.
    class SafetensorError(Exception):
        pass

    out = tmp_path / "model"
    with atomic.staged_directory(out) as staging:
        _checkpoint(staging, "1")
    with pytest.raises(RunStateError) as info:
        with atomic.staged_directory(out, what="the model") as staging:
            raise SafetensorError("Error while serializing: I/O error: (os error 28)")
    assert "disk is full" in str(info.value) and "still valid" in str(info.value)
    assert json.loads((out / "config.json").read_text()) == {"version": "1"}
    assert _siblings(out) == []


def test_checkpoint_swap_failing_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    with atomic.staged_directory(out) as staging:
        _checkpoint(staging, "1")
    real_rename = Path.rename
    calls = []

    def rename(self, target):
        calls.append(Path(target).name)
        if len(calls) == 2:  # the staging directory moving into place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(RunStateError, match="disk is full"):
        with atomic.staged_directory(out) as staging:
            _checkpoint(staging, "2")
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text()) == {"version": "1"}
    assert _siblings(out) == []


def test_programming_errors_in_a_checkpoint_block_are_not_disguised(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(KeyError):
        with atomic.staged_directory(out) as staging:
            _checkpoint(staging, "1")
            raise KeyError("a bug, not the disk")
    assert not out.exists() and _siblings(out) == []


# --------------------------------------------------------------------------- a real limit

REAL_LIMIT_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path

    import numpy as np
    import safetensors.numpy

    from after_ray.store import atomic
    from after_ray.store.run_state import RunState
    from after_ray.errors import RunStateError

    run_dir, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    ids = [f"c/u{i:03d}" for i in range(40)]
    state = RunState.open(run_dir)
    state.record_selection(0, ids, None, "random")
    state.append_labels(0, [{"utt_id": u, "label": "sad", "source": "human"} for u in ids[:2]])
    with atomic.staged_directory(model_dir) as staging:
        safetensors.numpy.save_file({"w": np.ones(64, np.float32)}, str(staging / "w.safetensors"))

    # From here on no file of this process may grow past the label log's size + 300 bytes:
    # the kernel cuts writes short and then fails them with EFBIG (SIGXFSZ ignored).
    limit = (run_dir / "labels.jsonl").stat().st_size + 300
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    outcome = {}

    def attempt(name, action):
        try:
            action()
        except RunStateError as exc:
            outcome[name] = str(exc)

    def write_bigger_model():
        with atomic.staged_directory(model_dir, what="the model") as staging:
            safetensors.numpy.save_file(
                {"w": np.zeros(100_000, np.float32)}, str(staging / "w.safetensors")
            )

    rows = [{"utt_id": u, "label": "happy", "source": "human"} for u in ids[2:]]
    attempt("labels", lambda: state.append_labels(0, rows))
    attempt("state", lambda: state.mark_stage_done("big", {"x": "y" * 5000}))
    attempt("checkpoint", write_bigger_model)
    state.close()
    print(json.dumps(outcome))
    """
)


def run_limit_script(script: str, *args: Path, timeout: int) -> dict:
    """Run ``script`` in a child process (the size limit must not hit pytest itself); it prints
    its findings as JSON on its last line."""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_real_file_size_limit_leaves_the_run_and_checkpoint_intact(tmp_path):
    run_dir, model_dir = tmp_path / "run", tmp_path / "model"
    outcome = run_limit_script(REAL_LIMIT_SCRIPT, run_dir, model_dir, timeout=120)
    assert sorted(outcome) == ["checkpoint", "labels", "state"], outcome
    for message in outcome.values():
        assert "File too large" in message and "still valid" in message, message
        assert "ulimit -f" in message, message
    # The partial append was cut back: exactly the two labels stored before the limit.
    lines = (run_dir / LABELS_FILE).read_text().splitlines()
    assert [json.loads(x)["label"] for x in lines] == ["sad", "sad"]
    assert check_run_dir(run_dir) == []
    with RunState.open(run_dir, create=False) as state:
        assert len(state.labels()) == 2 and state.stage_info("big") is None
    import safetensors.numpy

    assert safetensors.numpy.load_file(str(model_dir / "w.safetensors"))["w"].tolist() == [1.0] * 64
    assert _siblings(model_dir) == ["run"]


# --------------------------------------------------------------------------- training state


def _training_state(step: int = 7) -> dict:
    import torch

    return {
        "format": 1,
        "step": step,
        "model": {"w": torch.arange(4000, dtype=torch.float32)},
        "loss_history": [1.0, 0.5],
    }


@pytest.mark.parametrize("room", [0, 1, 100, 5000])
def test_save_training_state_on_a_full_disk_keeps_the_previous_state(tmp_path, monkeypatch, room):
    from after_ray.store import torch_state

    target = tmp_path / "000003" / "tapt_state.pt"
    torch_state.save_training_state(_training_state(step=3), target)
    before = target.read_bytes()
    monkeypatch.setattr(atomic, "open", _Disk(room).open, raising=False)
    with pytest.raises(RunStateError) as info:
        torch_state.save_training_state(_training_state(), target)
    _assert_disk_full_message(info.value, target, "the training state")
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["tapt_state.pt"]  # no temp file
    monkeypatch.undo()
    torch_state.save_training_state(_training_state(), target)  # room again: the same call works
    assert torch_state.load_training_state(target)["step"] == 7


def test_save_training_state_with_a_failing_fsync_keeps_the_previous_state(tmp_path, monkeypatch):
    from after_ray.store import torch_state

    target = tmp_path / "tapt_state.pt"
    torch_state.save_training_state(_training_state(step=3), target)
    before = target.read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", _raise(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(RunStateError) as info:
        torch_state.save_training_state(_training_state(), target)
    monkeypatch.undo()
    _assert_disk_full_message(info.value, target, "the training state")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tapt_state.pt"]


def test_save_training_state_does_not_disguise_a_state_that_cannot_be_serialised(tmp_path):
    from after_ray.store import torch_state

    target = tmp_path / "tapt_state.pt"
    torch_state.save_training_state(_training_state(step=3), target)
    before = target.read_bytes()
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever torch.save raises
        torch_state.save_training_state({"step": 4, "callback": lambda: None}, target)
    assert not isinstance(info.value, RunStateError)  # a bug, not the disk
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tapt_state.pt"]


def _cut(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


STATE_DAMAGE = {
    "truncated": lambda p: _cut(p),
    "last_byte_missing": lambda p: _cut(p, len(p.read_bytes()) - 1),
    "empty": lambda p: _cut(p, 0),
    "garbage": lambda p: p.write_bytes(b"not a torch file\n" * 100),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_load_training_state_of_a_damaged_file_names_it(tmp_path, damage):
    from after_ray.store.torch_state import load_training_state, save_training_state

    target = save_training_state(_training_state(), tmp_path / "000004" / "tapt_state.pt")
    STATE_DAMAGE[damage](target)
    with pytest.raises(RunStateError) as info:
        load_training_state(target)
    message = str(info.value)
    assert str(target) in message, message
    assert f"delete the checkpoint directory {str(target.parent)!r}" in message, message
    assert ("missing" if damage == "missing" else "corrupt") in message, message


def test_load_training_state_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    import torch

    from after_ray.store.torch_state import load_training_state

    target = tmp_path / "tapt_state.pt"
    torch.save([torch.ones(2)], target)  # loads fine with weights_only, but is no state
    with pytest.raises(RunStateError, match="holds a list, not a state dict"):
        load_training_state(target)


# --------------------------------------------------------------------------- classifier checkpoint


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    """A tiny two-class classifier saved by save_classifier, and its eval-mode outputs."""
    import torch

    from after_ray.config.backbone import BackboneConfig
    from after_ray.config.finetune import FinetuneConfig
    from after_ray.models.backbones import load_backbone
    from after_ray.models.classifier import build_classifier
    from after_ray.models.classifier_io import save_classifier

    cfg = FinetuneConfig()
    backbone = load_backbone(BackboneConfig(name_or_path="tiny", seed=5), for_pretraining=False)
    model = build_classifier(backbone, 2, cfg).eval()
    out = save_classifier(
        model, tmp_path_factory.mktemp("clf") / "model", class_names=["calm", "angry"],
        finetune_cfg=cfg,
    )  # fmt: skip
    audio = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(audio, torch.ones_like(audio, dtype=torch.long))
    return out, audio, expected


def _logits(output):
    return output["logits"] if isinstance(output, dict) else getattr(output, "logits", output)


def _other_weights(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"head.weight": torch.ones(3, 3)}, str(d / "classifier.safetensors"))


CLASSIFIER_DAMAGE = {
    "weights_missing": (
        lambda d: (d / "classifier.safetensors").unlink(),
        "classifier.safetensors is missing",
    ),
    "weights_truncated": (
        lambda d: _cut(d / "classifier.safetensors"),
        "classifier.safetensors is corrupt or truncated",
    ),
    "weights_garbage": (
        lambda d: (d / "classifier.safetensors").write_bytes(b"\xff" * 64),
        "classifier.safetensors is corrupt or truncated",
    ),
    "weights_of_another_model": (_other_weights, "does not match the model"),
    "backbone_weights_truncated": (
        lambda d: _cut(d / "backbone" / "model.safetensors"),
        "model.safetensors is corrupt or truncated",
    ),
    "backbone_missing": (lambda d: shutil.rmtree(d / "backbone"), "backbone/config.json"),
    "meta_incomplete": (
        lambda d: (d / "classifier.json").write_text('{"class_names": ["calm", "angry"]}'),
        "classifier.json lacks",
    ),
}


@pytest.mark.parametrize("damage", sorted(CLASSIFIER_DAMAGE))
def test_load_classifier_of_a_damaged_checkpoint_names_it(saved_classifier, tmp_path, damage):
    from after_ray.models.classifier_io import load_classifier

    model_dir = tmp_path / "model"
    shutil.copytree(saved_classifier[0], model_dir)
    mutate, expected = CLASSIFIER_DAMAGE[damage]
    mutate(model_dir)
    with pytest.raises(RunStateError) as info:
        load_classifier(model_dir)
    message = str(info.value)
    assert str(model_dir) in message and expected in message, message
    assert "Delete that directory" in message and "retrains that round" in message, message


def test_an_intact_classifier_checkpoint_loads_and_predicts_the_same(saved_classifier, tmp_path):
    """The control for the damage cases: the copy they start from is a working checkpoint."""
    import torch

    from after_ray.models.classifier_io import load_classifier, verify_classifier_dir

    model_dir = tmp_path / "model"
    shutil.copytree(saved_classifier[0], model_dir)
    verify_classifier_dir(model_dir)
    model, class_names = load_classifier(model_dir)
    _, audio, expected = saved_classifier
    assert class_names == ["calm", "angry"]
    with torch.no_grad():
        got = model(audio, torch.ones_like(audio, dtype=torch.long))
    assert torch.allclose(_logits(got), _logits(expected), atol=1e-6)


# --------------------------------------------------------------------------- checkpoints, real limit

CHECKPOINT_LIMIT_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, resource, signal, sys
    from pathlib import Path

    import torch

    from after_ray.errors import RunStateError
    from after_ray.models.backbones import load_backbone
    from after_ray.models.classifier_io import save_classifier
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.classifier import build_classifier
    from after_ray.config.finetune import FinetuneConfig
    from after_ray.store.torch_state import save_training_state
    from after_ray.training.tapt import save_tapt_result

    root = Path(sys.argv[1])
    tiny = BackboneConfig(name_or_path="tiny")
    backbone = load_backbone(tiny, for_pretraining=True)
    classifier = build_classifier(load_backbone(tiny, for_pretraining=False), 2, FinetuneConfig())
    state = root / "ckpt" / "tapt_state.pt"

    def save_model():
        save_classifier(
            classifier, root / "model", class_names=["a", "b"], finetune_cfg=FinetuneConfig()
        )

    save_training_state({"step": 0, "w": torch.ones(4)}, state)
    save_tapt_result(backbone, root / "tapt")
    save_model()

    def digests():
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
        }

    before = digests()
    # The weights (~0.4 MB) cannot be written past this: short writes, then EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    outcome = {}

    def attempt(name, action):
        try:
            action()
        except RunStateError as exc:
            outcome[name] = str(exc)

    attempt("state", lambda: save_training_state({"step": 1, "model": backbone.state_dict()}, state))
    attempt("tapt", lambda: save_tapt_result(backbone, root / "tapt"))
    attempt("classifier", save_model)
    every = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    print(json.dumps({"outcome": outcome, "before": before, "after": digests(), "all": every}))
    """
)


def test_real_file_size_limit_keeps_training_state_and_model_checkpoints(tmp_path):
    root = tmp_path / "run"
    report = run_limit_script(CHECKPOINT_LIMIT_SCRIPT, root, timeout=300)
    outcome = report["outcome"]
    assert sorted(outcome) == ["classifier", "state", "tapt"], outcome
    for name, (what, path) in {
        "state": ("the training state", root / "ckpt" / "tapt_state.pt"),
        "tapt": ("the TAPT-adapted backbone", root / "tapt"),
        "classifier": ("the classifier checkpoint", root / "model"),
    }.items():
        message = outcome[name]
        assert what in message and repr(str(path)) in message, message
        assert "File too large" in message and "still valid" in message, message
    # Every previous file is byte-identical, and nothing temporary was left anywhere.
    assert report["after"] == report["before"]
    assert [x for x in report["all"] if any(part.startswith(".") for part in Path(x).parts)] == []


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail
