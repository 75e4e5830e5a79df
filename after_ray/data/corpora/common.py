"""Shared pieces of the corpus loaders: walking a corpus tree, decoys, skip counts, row building.

Every loader walks its tree with ``walk_files`` (symlinked folders followed once, hidden folders
and macOS ``__MACOSX`` / ``._*`` AppleDouble debris left out), records everything it passes over
in a ``Skips`` counter, and logs one INFO line per load saying how many rows it found and what it
skipped. Rows are always returned sorted by ``utt_id`` so the order never depends on the
filesystem.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from after_ray.errors import CorpusError

log = logging.getLogger("after_ray.data.corpora")

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"})
# Folders that never hold corpus audio: macOS zip debris and version-control/cache folders.
IGNORED_DIR_NAMES = frozenset({"__MACOSX", "__pycache__"})


class Skips:
    """Counts of files a loader passed over, by reason, with a few example paths per reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, path: str | Path | None = None) -> None:
        self.counts[reason] += 1
        if path is not None:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < 3:
                examples.append(str(path))

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = [f"{n} {reason}" for reason, n in sorted(self.counts.items())]
        return "skipped " + ", ".join(parts)


def is_appledouble(name: str) -> bool:
    """macOS resource-fork files (``._name``) copied next to the real ones; never corpus data."""
    return name.startswith("._")


def require_dir(root: str | Path, corpus: str, expected: str) -> Path:
    """``root`` as an absolute resolved directory, or a CorpusError saying what belongs there."""
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise CorpusError(f"{corpus} root {str(path)!r} {what}: {expected}")
    return path.resolve()


def walk_files(root: Path, skips: Skips | None = None) -> Iterator[Path]:
    """Every regular file below ``root``, sorted per folder; AppleDouble files counted, left out.

    Symlinked folders are followed, each real folder at most once (no loops, no double counting).
    Hidden folders (``.git``, ``.Trash``...) and ``__MACOSX`` are not entered.
    """
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in IGNORED_DIR_NAMES
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_appledouble(name):
                if skips is not None:
                    skips.add("AppleDouble ._ files", path)
                continue
            if name.startswith("."):
                continue  # .DS_Store and friends
            yield path


def list_dir_files(directory: Path, skips: Skips | None = None) -> list[Path]:
    """The regular files directly in ``directory`` (not recursive), AppleDouble files left out."""
    out = []
    for path in sorted(directory.iterdir()):
        if is_appledouble(path.name):
            if skips is not None:
                skips.add("AppleDouble ._ files", path)
            continue
        if path.name.startswith(".") or not path.is_file():
            continue
        out.append(path)
    return out


def is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def utt_id_for(corpus: str, root: Path, path: Path) -> str:
    """``<corpus>/<path below root without extension>``, POSIX slashes: stable across machines."""
    return f"{corpus}/{path.relative_to(root).with_suffix('').as_posix()}"


def shallowest_first(paths: Iterable[Path]) -> list[Path]:
    """Order candidate copies of one file so the least nested copy wins, ties broken by path."""
    return sorted(paths, key=lambda p: (len(p.parts), p.as_posix()))


def make_row(
    *,
    utt_id: str,
    path: Path,
    label: str | None,
    speaker: str,
    corpus: str,
    votes: list[str] | None = None,
    session: str | None = None,
    gender: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    return {
        "utt_id": utt_id,
        "path": str(path),
        "label": label,
        "votes": list(votes) if votes else None,
        "speaker": speaker,
        "session": session,
        "gender": gender,
        "corpus": corpus,
        "split": split,
    }


def finish(
    rows: list[dict[str, Any]],
    *,
    corpus: str,
    root: Path,
    skips: Skips,
    expected: str,
    title: str | None = None,
) -> list[dict[str, Any]]:
    """Sort rows by utt_id, refuse duplicate ids and empty results, log one summary line."""
    if not rows:
        detail = f" ({skips.describe()})" if skips.total() else ""
        raise CorpusError(
            f"{title or corpus} root {str(root)!r} holds no usable utterances{detail}: {expected}"
        )
    rows = sorted(rows, key=lambda r: r["utt_id"])
    ids = [r["utt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)[:5]
        raise CorpusError(
            f"{title or corpus} root {str(root)!r}: several files map to the same utt_id, "
            f"e.g. {dupes}; remove the duplicate copies"
        )
    log.info("%s: %d utterances from %s; %s", corpus, len(rows), root, skips.describe())
    for reason, examples in sorted(skips.examples.items()):
        log.debug("%s: %s, e.g. %s", corpus, reason, examples)
    return rows
