"""Bad audio at scale (issue #7): a 240-file CSV corpus, a third of it broken in every way we know,
through the real pipeline (prepare + an AL round on the session Ray).

Every broken file must be in the quarantine report (Parquet and its CSV twin) with its exact
reason code, every good file (odd rates, 6 channels, odd names, a FLAC named .wav, ...) must be
in the manifest and be scored, and the printed summary line must match the counts. A second part
breaks files *after* prepare (deleted, truncated, overwritten) and checks that the streams a run
uses drop them with a warning instead of crashing, and that they can be added to the quarantine
table (stage ``load``); a run whose *pool* files break after prepare goes on without them and
quarantines them with stage ``load``.

File permissions: as root (here and in CI) ``chmod 000`` does not stop a read, so the locked
file is expected to be *usable* for a root run, and its unreadability is checked for real in a
child process that drops to uid 65534 (nobody). What root cannot read either is an entry the
kernel refuses to everyone (a write-only procfs file), which the corpus links to when it exists.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from after_ray.config.audio import AudioConfig
from after_ray.config.sections import load_config
from after_ray.data.audio import REASONS
from after_ray.data.quarantine import csv_twin, quarantine_lost_files, write_quarantine
from after_ray.distributed.audio_data import audio_dataset, probe_audio
from after_ray.distributed.worker_audio import InMemoryAudio, StreamedAudio
from after_ray.pipeline.runner import run_active_learning
from after_ray.store.run_state import RunState

pytestmark = [pytest.mark.ray]

CLASSES = ("angry", "happy", "neutral", "sad")
SPEAKERS = 8
N_GOOD = 157  # + a symlink, the chmod 000 file and its control: 160
NOBODY = 65534
# A file root cannot read either: procfs write-only entries deny reads to every user. Only ever
# opened read-only (by libsndfile, through the symlink the corpus holds).
WRITE_ONLY_PROC = Path("/proc/sys/vm/drop_caches")


@dataclass
class Corpus:
    root: Path  # folder holding labels.csv
    good: set[str]  # paths (as the manifest and the quarantine report write them)
    bad: dict[str, str]  # path -> expected reason code
    rates: dict[str, int]  # path -> native rate of the good files that are not 16 kHz mono
    locked: Path  # chmod 000 (usable for root: see the module docstring)
    control: Path  # a good file next to it, readable by nobody


def signal(seconds: float, sr: int, label_index: int, seed: int, channels: int = 1) -> np.ndarray:
    """A class-dependent tone plus noise, ``[samples, channels]`` at about -15 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = (140.0, 220.0, 330.0, 500.0)[label_index] * (1 + 0.05 * rng.standard_normal())
    x = 0.25 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2 * f0 * t)
    x = x + 0.02 * rng.standard_normal(len(t))
    return np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def wav_bytes(seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> bytes:
    """A plain 16-bit mono WAV (44-byte header) as bytes, to damage."""
    buffer = io.BytesIO()
    sf.write(buffer, signal(seconds, sr, 1, seed), sr, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def build_corpus(root: Path) -> Corpus:
    """240 files: 160 good of many shapes, 80 broken in 25 ways, listed in ``labels.csv``.

    (Run as root, the chmod 000 file is one of the good ones: see the module docstring.)
    """
    entries: list[tuple[str, str]] = []  # (path relative to root, label)
    good: set[str] = set()
    bad: dict[str, str] = {}
    rates: dict[str, int] = {}

    def add(rel: str, label: str, expected: str | None) -> Path:
        entries.append((rel, label))
        full = root / rel
        if expected is None:
            good.add(str(full))
        else:
            assert expected in REASONS, expected
            bad[str(full)] = expected
        full.parent.mkdir(parents=True, exist_ok=True)
        return full

    # ---- good: resampled, downmixed, odd names and containers, all must be used
    for i in range(N_GOOD):
        k, spk = i % 4, f"s{i % SPEAKERS}"
        seconds = 1.0 + (i % 5) * 0.25
        kind = i % 10
        if kind == 0:
            sr, ch, rel, fmt = 8000, 1, f"good/{spk}/u{i:03d}_8k.wav", {}
        elif kind == 1:
            sr, ch, rel, fmt = 96000, 1, f"good/{spk}/u{i:03d}_96k.wav", {}
        elif kind == 2:
            sr, ch, rel, fmt = 16000, 6, f"good/{spk}/u{i:03d}_6ch.wav", {}
        elif kind == 3:
            sr, ch, rel, fmt = 44100, 2, f"good/{spk}/u{i:03d}_stereo.flac", {}
        elif kind == 4:
            sr, ch, rel, fmt = 22050, 1, f"good/{spk}/u{i:03d}_24bit.wav", {"subtype": "PCM_24"}
        else:
            sr, ch, rel, fmt = 16000, 1, f"good/{spk}/u{i:03d}.wav", {}
        if i == 5:
            rel = f"good/{spk} dir/Ünïcødé 音声 (take 2).wav"  # spaces, non-ASCII, parentheses
        elif i == 15:
            rel = f'good/{spk}/naïve, "quoted" ½.wav'  # a comma and quotes: CSV quoting
        full = add(rel, CLASSES[k], None)
        if i == 25:  # a FLAC stream in a file named .wav: libsndfile reads the content
            sf.write(full, signal(seconds, sr, k, i, ch), sr, format="FLAC")
        elif i == 35:  # float samples beyond +-1: kept (normalisation rescales them)
            sf.write(full, 3.0 * signal(seconds, sr, k, i, ch), sr, subtype="FLOAT")
        else:
            sf.write(full, signal(seconds, sr, k, i, ch), sr, **fmt)
        if (sr, ch) != (16000, 1):
            rates[str(full)] = sr
        if i == 45:  # a streaming writer's unknown 'data' size (0xFFFFFFFF): not truncated
            raw = bytearray(full.read_bytes())
            assert raw[36:40] == b"data"
            raw[4:8] = raw[40:44] = b"\xff\xff\xff\xff"
            full.write_bytes(bytes(raw))
        if i == 55:  # a LIST chunk after the data: more bytes than 'data' declares, still fine
            raw = bytearray(full.read_bytes())
            payload = b"INFOICMT\x08\x00\x00\x00comment!"
            raw += b"LIST" + len(payload).to_bytes(4, "little") + payload
            raw[4:8] = (len(raw) - 8).to_bytes(4, "little")
            full.write_bytes(bytes(raw))
    target = root / "good" / "s1" / "u001_96k.wav"
    os.symlink(target, add("good/s1/link_to_u001.wav", "happy", None))

    # ---- broken, each with the reason it must get
    proto = wav_bytes()
    flac_path = root / "proto.flac"
    sf.write(flac_path, signal(2.0, 16000, 2, 7), 16000)
    flac = flac_path.read_bytes()
    flac_path.unlink()
    counts: Counter[str] = Counter()

    def broken(kind: str, reason: str, suffix: str = ".wav") -> Path:
        n = counts[kind]
        counts[kind] += 1
        return add(f"bad/{kind}_{n}{suffix}", CLASSES[n % 4], reason)

    for _ in range(5):
        broken("text_named_wav", "unreadable").write_text("not audio at all\n" * 40)
    for _ in range(5):
        broken("zero_bytes", "empty").write_bytes(b"")
    for _ in range(5):  # STREAMINFO (rate, channels, bits, total samples) overwritten
        raw = bytearray(flac)
        raw[8:42] = b"\xff" * 34
        broken("flac_bad_header", "unreadable", ".flac").write_bytes(bytes(raw))
    for j in range(3):  # a FLAC copy cut short: the decoder loses sync
        broken("flac_cut_short", "unreadable", ".flac").write_bytes(flac[: len(flac) // (2 + j)])
    ten_min = broken("ten_minutes", "too_long")  # checked from the header, never decoded
    sf.write(ten_min, signal(600.0, 16000, 0, 1), 16000, subtype="PCM_16")
    for j in range(5):
        x = signal(1.5, 16000, j % 4, 100 + j)
        x[100 + 10 * j : 200 + 10 * j] = np.nan
        sf.write(broken("nan_samples", "non_finite"), x, 16000, subtype="FLOAT")
    for j in range(2):
        x = signal(1.5, 16000, j % 4, 200 + j)
        x[7] = np.inf if j == 0 else -np.inf
        sf.write(broken("inf_samples", "non_finite"), x, 16000, subtype="FLOAT")
    for _ in range(8):
        broken("missing", "missing_file")  # listed, never written
    for j in range(2):
        os.symlink(root / "bad" / f"gone_{j}.wav", broken("dangling_link", "missing_file"))
    for j in range(5):
        silent = (
            broken("silent", "silent") if j else add("bad/silent ümlaut é.wav", "sad", "silent")
        )
        sf.write(silent, np.zeros((16000, 1), np.float32), 16000)
    for j in range(4):  # about -83 dBFS: below the -60 dBFS default
        sf.write(broken("quiet", "silent"), 1e-4 * signal(1.0, 16000, 0, j) / 0.25, 16000)
    for _ in range(2):  # a constant offset: loud, but no signal
        dc = np.full((16000, 1), 0.5, np.float32)
        sf.write(broken("dc_only", "silent"), dc, 16000, subtype="FLOAT")
    for j in range(5):
        sf.write(broken("too_short", "too_short"), signal(0.02, 16000, 1, j), 16000)
    for _ in range(2):
        broken("directory", "unreadable").mkdir()  # a directory named x.wav
    for j in range(6):  # the header says 2 s, the bytes hold less: an interrupted copy
        broken("truncated", "unreadable").write_bytes(proto[: len(proto) // (2 + j)])
    for _ in range(2):  # the 44-byte header of a 2 s file and nothing else
        broken("header_only", "unreadable").write_bytes(proto[:44])
    for _ in range(4):  # a valid header with 0 samples
        sf.write(broken("no_samples", "empty"), np.zeros((0, 1), np.float32), 16000)
    for j in range(2):
        sf.write(broken("nine_channels", "too_many_channels"), signal(1.0, 16000, 0, j, 9), 16000)
    for j in range(2):
        sf.write(broken("rate_2k", "unsupported_rate"), signal(1.0, 2000, 0, j), 2000)
    for _ in range(2):  # the header claims 1 MHz
        raw = bytearray(proto)
        raw[24:28] = (1_000_000).to_bytes(4, "little")
        broken("rate_1mhz", "unsupported_rate").write_bytes(bytes(raw))
    for _ in range(2):
        raw = bytearray(proto)
        raw[22:24] = b"\x00\x00"  # 0 channels
        broken("zero_channels", "unreadable").write_bytes(bytes(raw))
    for j in range(4):
        broken("random_bytes", "unreadable").write_bytes(np.random.default_rng(j).bytes(5000))
    os.mkfifo(broken("named_pipe", "unreadable"))  # opening it would block forever
    if _root_cannot_read(WRITE_ONLY_PROC):
        os.symlink(WRITE_ONLY_PROC, broken("root_cannot_read", "unreadable"))
    else:  # no such procfs entry here: another unreadable file keeps the corpus at 240
        broken("random_bytes", "unreadable").write_bytes(np.random.default_rng(9).bytes(5000))

    # ---- the chmod 000 file, and a readable control next to it (for the nobody probe)
    perm_dir = root / "perm"
    control = add("perm/control.wav", "angry", None)
    sf.write(control, signal(1.0, 16000, 0, 99), 16000)
    locked = root / "perm" / "locked.wav"
    sf.write(locked, signal(1.0, 16000, 1, 98), 16000)
    locked.chmod(0)
    try:
        locked.open("rb").close()
        locked_reason = None  # root (CAP_DAC_OVERRIDE): the file is readable, so it is used
    except PermissionError:
        locked_reason = "unreadable"
    add("perm/locked.wav", "happy", locked_reason)
    for d in (root.parent, root, perm_dir):  # nobody must reach the folder to see the file
        d.chmod(0o755)
    control.chmod(0o644)

    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker"])
        for n, (rel, label) in enumerate(entries):
            speaker = rel.split("/")[1].split(" ")[0] if rel.startswith("good/") else None
            writer.writerow([rel, label, speaker or f"s{n % SPEAKERS}"])
    return Corpus(root, good, bad, rates, locked, control)


def _root_cannot_read(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True
    except OSError:
        return False  # not there (another kernel, no procfs): leave that entry out


@pytest.fixture(scope="module")
def corpus():
    # Outside pytest's 0700 tmp folders, so the nobody probe can traverse to the locked file.
    top = Path(tempfile.mkdtemp(prefix="after-ray-bad-audio-"))
    try:
        yield build_corpus(top / "bad")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def config_file(tmp: Path, root: Path) -> Path:
    data = {
        "run": {"name": "bad-audio", "seed": 1, "output_dir": str(tmp / "runs")},
        "corpus": {
            "name": "csv",
            "root": str(root),
            "split": {"method": "speaker", "val_fraction": 0.125, "test_fraction": 0.25},
        },
        "tapt": {"enabled": False},
        "finetune": {"epochs": 1, "batch_size": 8},
        "al": {
            # One round (the slow parts are Ray Data and actor start-ups, per stage): the cold
            # start scores the whole pool for its embeddings, so every good pool file is decoded
            # and scored, then fine-tuning, then the test split is scored.
            "cold_start": "after_init",
            "strategy": "entropy",
            "mc_dropout_samples": 0,
            "budget": {"unit": "fraction", "initial": 0.2, "per_round": 0.1, "max_total": 0.2},
        },
        "ray": {"num_workers": 0, "scoring_batch_size": 16},
    }
    path = tmp / "bad_audio.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def run(ray_session, corpus, tmp_path_factory):
    """The real pipeline on the corpus: prepare + one AL round; its printed output kept."""
    tmp = tmp_path_factory.mktemp("bad_audio_run")
    config = load_config(config_file(tmp, corpus.root))
    printed = io.StringIO()
    with redirect_stdout(printed):
        outcome = run_active_learning(config)
    return config, outcome, printed.getvalue()


@pytest.mark.slow
def test_every_broken_file_is_quarantined_with_its_reason_and_every_good_one_is_used(corpus, run):
    config, outcome, printed = run
    run_dir = config.run_dir
    assert outcome.finished, printed
    total = len(corpus.good) + len(corpus.bad)
    assert total == 240 and len(corpus.bad) >= 79

    # The quarantine report, Parquet and CSV: exactly the broken files, each with its reason.
    table = pq.read_table(run_dir / "quarantine.parquet").to_pylist()
    got = {row["path"]: row["reason"] for row in table}
    assert len(got) == len(table)  # one row per file
    assert got == corpus.bad
    assert all(row["stage"] == "probe" and row["detail"] for row in table)
    with open(run_dir / "quarantine.csv", newline="", encoding="utf-8") as handle:
        twin = list(csv.DictReader(handle))
    assert {row["path"]: row["reason"] for row in twin} == corpus.bad
    assert len(twin) == len(table)
    # The details say what is wrong in words a person can act on.
    detail = {row["path"]: row["detail"] for row in table}

    def details_of(kind: str) -> list[str]:
        return [d for p, d in detail.items() if Path(p).name.startswith(kind)]

    for d in details_of("truncated") + details_of("header_only"):
        assert d.startswith("truncated: the WAV header declares 2.000 s"), d
    assert details_of("named_pipe") == ["not a regular file (a named pipe)"]
    assert all("is a directory" in d for d in details_of("directory"))
    assert all("Format not recognised" in d for d in details_of("text_named_wav"))
    assert all(d.startswith("600.00 s > audio.max_duration_s") for d in details_of("ten_min"))
    for d in details_of("root_cannot_read"):
        assert d.startswith("permission denied for uid")

    # The manifest: every good file (and only those), each in train / val / test.
    rows = pq.read_table(run_dir / "manifest.parquet").to_pylist()
    assert {r["path"] for r in rows} == corpus.good
    assert len(rows) == len(corpus.good)
    assert Counter(r["split"] for r in rows).keys() == {"train", "val", "test"}  # none is null
    by_path = {r["path"]: r for r in rows}
    for path, rate in corpus.rates.items():  # native rates recorded, not rejected
        assert by_path[path]["sample_rate"] == rate
    assert sum(r == 96000 for r in corpus.rates.values()) >= 16
    assert sum(r == 8000 for r in corpus.rates.values()) >= 16
    odd = [p for p in corpus.good if "音声" in p or '"quoted"' in p]
    assert len(odd) == 2 and all(by_path[p]["duration_s"] > 0.9 for p in odd)

    # They were all decoded, resampled and scored: the cold start's pool scores cover the whole
    # pool and the test scores the whole test split (6-channel, 8 kHz and 96 kHz files included).
    pool = {r["utt_id"] for r in rows if r["split"] == "train"}
    test = {r["utt_id"] for r in rows if r["split"] == "test"}
    (pool_scores,) = (run_dir / "scores" / "pool").glob("*/scores.parquet")
    assert set(pq.read_table(pool_scores, columns=["utt_id"]).column(0).to_pylist()) == pool
    test_scores_files = list((run_dir / "scores" / "test").glob("*/scores.parquet"))
    assert len(test_scores_files) == 1
    for test_scores in test_scores_files:
        assert set(pq.read_table(test_scores, columns=["utt_id"]).column(0).to_pylist()) == test
    metrics = json.loads((run_dir / "rounds" / "round_000" / "metrics.json").read_text())
    assert metrics["n_labeled"] == round(0.2 * len(pool))
    assert metrics["test"]["n"] == len(test)  # every test file evaluated

    # The one-line summary, printed as the run went, matches the counts.
    reasons = Counter(corpus.bad.values())
    listed = ", ".join(f"{name} {n}" for name, n in sorted(reasons.items()))
    share = 100.0 * len(corpus.bad) / total
    expected = (
        f"quarantine: {len(corpus.bad)} of {total} files ({share:.1f}%) -> "
        f"{run_dir / 'quarantine.parquet'} (reasons: {listed})"
    )
    assert expected in printed.splitlines(), printed
    assert f"prepare: {len(corpus.good)} utterances -> " in printed


def test_the_locked_file_is_unreadable_for_a_user_without_privileges(corpus):
    """chmod 000 for real: the probe runs in a child that drops from root to nobody."""
    if os.geteuid() != 0:
        pytest.skip("not root: the pipeline run itself sees the locked file as unreadable")
    code = (
        "import json, os, sys\n"
        "from after_ray.data.audio import AudioConfig, probe_file\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "out = {p: probe_file(p, AudioConfig()).detail for p in sys.argv[1:]}\n"
        "out['uid'] = os.geteuid()\n"
        "print(json.dumps(out))\n"
    )
    mode = stat.S_IMODE(corpus.locked.stat().st_mode)
    assert mode == 0
    proc = subprocess.run(
        [sys.executable, "-c", code, str(corpus.locked), str(corpus.control)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"this root cannot change its uid (no CAP_SETUID): {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out == {
        "uid": NOBODY,
        str(corpus.locked): f"permission denied for uid {NOBODY}",  # the unreadable reason's
        str(corpus.control): None,  # usable: nobody can reach the folder, so it is the mode
    }


def test_files_broken_after_prepare_are_dropped_by_every_stream(
    ray_session, corpus, tmp_path, caplog
):
    """Deleted, truncated or overwritten between prepare and the run: the score stream, the
    streamed and the in-memory training audio drop those rows (a warning each) and keep going;
    probing them again gives the reason a new prepare would record, and they can be added to
    the run's quarantine table."""
    # Copies of 12 good files (8 kHz, 16 kHz, 22.05 kHz 24-bit, 6 channels): the corpus stays
    # intact for the other tests.
    rows = []
    for i, path in enumerate(sorted(p for p in corpus.good if "/good/s0/" in p)[:12]):
        copy = tmp_path / f"copy_{i}{Path(path).suffix}"
        shutil.copyfile(path, copy)
        rows.append({"utt_id": f"c/{i:02d}", "path": str(copy), "label": CLASSES[i % 4]})
    # The truncation is one the WAV header shows (a FLAC cut short fails to decode as well).
    truncated = next(r for r in rows if sf.info(r["path"]).format == "WAV")
    deleted, overwritten = [r for r in rows if r is not truncated][:2]
    Path(deleted["path"]).unlink()
    data = Path(truncated["path"]).read_bytes()
    Path(truncated["path"]).write_bytes(data[: len(data) // 2])
    Path(overwritten["path"]).write_text("overwritten by a text editor\n")
    broken = {deleted["utt_id"], truncated["utt_id"], overwritten["utt_id"]}
    kept = {r["utt_id"] for r in rows} - broken
    cfg = AudioConfig(train_crop_s=1.0)
    classes = {c: i for i, c in enumerate(CLASSES)}

    scored = audio_dataset(rows, cfg, mode="score", label_to_index=classes).take_all()
    assert {r["utt_id"] for r in scored} == kept

    with caplog.at_level(logging.WARNING, logger="after_ray.distributed.worker_audio"):
        in_memory = InMemoryAudio(rows, cfg, classes)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert sorted(m.split()[1] for m in dropped) == sorted(broken), dropped
    for audio in (in_memory, StreamedAudio(rows, cfg, classes)):
        seen = [u for b in audio.train_batches(seed=0, epoch=0, batch_size=4) for u in b["utt_id"]]
        assert sorted(seen) == sorted(kept), type(audio).__name__
        evaluated = {u for b in audio.eval_batches(batch_size=4) for u in b["utt_id"]}
        assert evaluated == kept, type(audio).__name__

    expected = {
        deleted["utt_id"]: "missing_file",
        truncated["utt_id"]: "unreadable",
        overwritten["utt_id"]: "unreadable",
    }
    good, quarantined = probe_audio(rows, cfg)
    assert set(good.column("utt_id").to_pylist()) == kept
    assert {r["utt_id"]: r["reason"] for r in quarantined.to_pylist()} == expected

    # What a run does with the rows a stream dropped: probe them again and add them to the
    # run's quarantine table with stage "load" (next to the prepare stage's rows, no duplicate).
    earlier = {"utt_id": "c/x", "path": "/x.wav", "reason": "silent", "detail": "-90 dBFS"}
    table_path = write_quarantine([{**earlier, "stage": "probe"}], tmp_path / "quarantine.parquet")
    before = pq.read_table(table_path).to_pylist()
    lost = [r for r in rows if r["utt_id"] not in kept]
    for _ in range(2):  # a second call (a resumed run) adds nothing
        assert sorted(quarantine_lost_files(lost, cfg, table_path)) == sorted(expected)
    after = pq.read_table(table_path).to_pylist()
    assert after[: len(before)] == before
    added = {r["utt_id"]: (r["reason"], r["stage"]) for r in after[len(before) :]}
    assert added == {u: (reason, "load") for u, reason in expected.items()}
    with open(csv_twin(table_path), newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(after)
    assert quarantine_lost_files(rows[3:5], cfg, table_path) == []  # still fine: not listed


def small_corpus(root: Path, n: int = 48) -> Path:
    """``n`` good 1 s files of 6 speakers in the CSV layout."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker"])
        for i in range(n):
            rel = f"s{i % 6}/u{i:03d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, signal(1.0, 16000, i % 4, i), 16000)
            writer.writerow([rel, CLASSES[i % 4], f"s{i % 6}"])
    return root


@pytest.mark.slow
def test_a_run_goes_on_when_pool_files_break_after_prepare(ray_session, tmp_path, monkeypatch):
    from after_ray.pipeline import runner

    root = small_corpus(tmp_path / "small")
    config = load_config(config_file(tmp_path, root))
    config.al.budget.initial = config.al.budget.per_round = 0.25  # two rounds, each scoring
    config.al.budget.max_total = 0.5
    victims: dict[str, str] = {}
    original = runner.stage_tapt

    def break_files_then_tapt(config, state, pool_rows):
        # Runs right after prepare: one pool file deleted, one truncated.
        gone, cut = sorted(pool_rows, key=lambda r: r["utt_id"])[:2]
        Path(gone["path"]).unlink()
        data = Path(cut["path"]).read_bytes()
        Path(cut["path"]).write_bytes(data[: len(data) // 2])
        victims.update({gone["utt_id"]: "missing_file", cut["utt_id"]: "unreadable"})
        return original(config, state, pool_rows)

    monkeypatch.setattr(runner, "stage_tapt", break_files_then_tapt)
    assert run_active_learning(config).finished
    table = pq.read_table(config.run_dir / "quarantine.parquet").to_pylist()
    assert {r["utt_id"]: (r["reason"], r["stage"]) for r in table} == {
        u: (reason, "load") for u, reason in victims.items()
    }
    with RunState.open(config.run_dir) as state:
        chosen = {u for r in state.rounds() for u in state.selection(r)}
    assert chosen and not chosen & set(victims)
