"""Speaker-independent train/val/test splits and leave-one-session-out folds.

Every split is a pure function of the rows and a seed: speakers are sorted by name before the
seeded shuffle, so filesystem order (the AFTER code's ``os.listdir`` split) never matters, and
validation speakers are always disjoint from test speakers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from after_ray.errors import ConfigError, CorpusError


def _speakers(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({row["speaker"] for row in rows})


def _take(n_total: int, fraction: float) -> int:
    return max(1, int(round(n_total * fraction)))


def speaker_split(
    rows: list[dict[str, Any]], *, val_fraction: float, test_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Assign ``split`` by speaker: test and val speakers are drawn with the seed, the rest train."""
    speakers = _speakers(rows)
    if len(speakers) < 3:
        raise CorpusError(
            f"a speaker-independent split needs at least 3 speakers, the corpus has "
            f"{len(speakers)}: use corpus.split.method=predefined or add speakers"
        )
    order = np.random.default_rng(seed).permutation(len(speakers))
    shuffled = [speakers[i] for i in order]
    n_test = _take(len(speakers), test_fraction)
    n_val = _take(len(speakers), val_fraction)
    if n_test + n_val >= len(speakers):
        n_test, n_val = 1, 1
    role = {s: "test" for s in shuffled[:n_test]}
    role.update({s: "val" for s in shuffled[n_test : n_test + n_val]})
    return [{**row, "split": role.get(row["speaker"], "train")} for row in rows]


def leave_one_session_out(
    rows: list[dict[str, Any]], *, test_session: str, val_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """The ``test_session``'s rows are test; val speakers come from the other sessions."""
    sessions = sorted({row["session"] for row in rows if row.get("session")})
    if test_session not in sessions:
        raise ConfigError(
            f"corpus.split.test_session: {test_session!r} is not a session of this corpus; "
            f"sessions found: {sessions}"
        )
    rest = [row for row in rows if row.get("session") != test_session]
    rest_speakers = _speakers(rest)
    if len(rest_speakers) < 2:
        raise CorpusError(
            "leave-one-session-out needs at least 2 speakers outside the test session"
        )
    order = np.random.default_rng(seed).permutation(len(rest_speakers))
    n_val = min(_take(len(rest_speakers), val_fraction), len(rest_speakers) - 1)
    val_speakers = {rest_speakers[i] for i in order[:n_val]}
    out = []
    for row in rows:
        if row.get("session") == test_session:
            split = "test"
        elif row["speaker"] in val_speakers:
            split = "val"
        else:
            split = "train"
        out.append({**row, "split": split})
    return out


def loso_folds(rows: list[dict[str, Any]], *, val_fraction: float, seed: int):
    """Yield (session, rows with splits) for every session held out in turn."""
    for session in sorted({row["session"] for row in rows if row.get("session")}):
        yield (
            session,
            leave_one_session_out(rows, test_session=session, val_fraction=val_fraction, seed=seed),
        )


def predefined_split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the corpus's own split column; rows without one are training rows."""
    return [{**row, "split": row.get("split") or "train"} for row in rows]


def assign_splits(rows: list[dict[str, Any]], split_cfg) -> list[dict[str, Any]]:
    """Dispatch on ``corpus.split.method`` (a ``SplitConfig``)."""
    if split_cfg.method == "speaker":
        return speaker_split(
            rows,
            val_fraction=split_cfg.val_fraction,
            test_fraction=split_cfg.test_fraction,
            seed=split_cfg.seed,
        )
    if split_cfg.method == "loso":
        return leave_one_session_out(
            rows,
            test_session=split_cfg.test_session,
            val_fraction=split_cfg.val_fraction,
            seed=split_cfg.seed,
        )
    return predefined_split(rows)
