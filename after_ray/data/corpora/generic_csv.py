"""A corpus described by a CSV: ``path,label[,speaker,session,gender,split,votes]``.

``root`` is the CSV itself or a folder holding ``labels.csv`` (``file=`` picks another name).
Paths are relative to the CSV's folder (absolute paths are kept). ``votes`` holds the
annotators' labels separated by ``;``. An empty (or absent) label is an unlabeled pool row.
Labels and votes are normalised to canonical names where a synonym is known (``Anger`` ->
angry); other spellings are lower-cased and kept. The corpus name (``corpus_name``, default
the CSV folder's name) prefixes utt_ids and speakers; a missing speaker is ``<corpus>/unknown``.
Files listed but missing on disk are not dropped here: the prepare stage quarantines them with
the reason ``missing_file``. The demo corpus is written in this layout.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path, PurePath
from typing import Any

from after_ray.data.corpora.common import log
from after_ray.data.corpora.labels import canonical
from after_ray.errors import CorpusError

REQUIRED = ("path",)
OPTIONAL = ("label", "speaker", "session", "gender", "split", "votes")
SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
GENDERS = {"f": "F", "female": "F", "m": "M", "male": "M"}


def load(
    root: str | Path, *, corpus_name: str | None = None, file: str = "labels.csv"
) -> list[dict[str, Any]]:
    """Manifest rows of the utterances listed in the corpus CSV, sorted by utt_id."""
    root = Path(root).expanduser()
    csv_path = root / file if root.is_dir() else root
    if not csv_path.is_file():
        raise CorpusError(
            f"CSV corpus: {str(csv_path)!r} not found; point corpus.root at a folder holding "
            f"{file} (header path,label[,speaker,session,gender,split,votes]) or at the CSV itself"
        )
    base = csv_path.parent.resolve()
    name = corpus_name or base.name
    rows: list[dict[str, Any]] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise CorpusError(
                f"CSV corpus {str(csv_path)!r}: the header {header} lacks {missing}; the first "
                "line must be path,label[,speaker,session,gender,split,votes]"
            )
        for line, raw in enumerate(reader, start=2):
            rec = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            rows.append(_row(rec, line=line, csv_path=csv_path, base=base, name=name))
    ids = Counter(r["utt_id"] for r in rows)
    dupes = sorted(k for k, n in ids.items() if n > 1)
    if dupes:
        raise CorpusError(
            f"CSV corpus {str(csv_path)!r} lists the same file more than once, e.g. {dupes[:5]}; "
            "keep one line per file"
        )
    if not rows:
        raise CorpusError(f"CSV corpus {str(csv_path)!r} lists no files")
    log.info("%s: %d utterances from %s", name, len(rows), csv_path)
    return sorted(rows, key=lambda r: r["utt_id"])


def _row(
    rec: dict[str, str], *, line: int, csv_path: Path, base: Path, name: str
) -> dict[str, Any]:
    where = f"CSV corpus {str(csv_path)!r} line {line}"
    if not rec.get("path"):
        raise CorpusError(f"{where}: empty path")
    listed = Path(rec["path"])
    path = listed if listed.is_absolute() else base / listed
    try:
        below = path.relative_to(base)
    except ValueError:
        # Outside the CSV's folder: the full path (without its anchor) keeps the id unique.
        below = PurePath(*path.parts[1:])
    split_text = rec.get("split", "").lower()
    if split_text and split_text not in SPLIT_NAMES:
        raise CorpusError(f"{where}: split {rec['split']!r} must be train, val, test or empty")
    gender_text = rec.get("gender", "").lower()
    if gender_text and gender_text not in GENDERS:
        raise CorpusError(f"{where}: gender {rec['gender']!r} must be F, M or empty")
    votes = [canonical(v) for v in rec.get("votes", "").split(";") if v.strip()]
    return {
        "utt_id": f"{name}/{below.with_suffix('').as_posix()}",
        "path": str(path),
        "label": canonical(rec.get("label")),
        "votes": votes or None,
        "speaker": f"{name}/{rec.get('speaker') or 'unknown'}",
        "session": rec.get("session") or None,
        "gender": GENDERS.get(gender_text),
        "corpus": name,
        "split": SPLIT_NAMES.get(split_text),
    }
