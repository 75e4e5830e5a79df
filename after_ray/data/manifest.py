"""The manifest: one Parquet row per utterance, the only way the engine refers to audio.

Schema (``MANIFEST_SCHEMA``):

=============  ==================  ======================================================
column         type                meaning
=============  ==================  ======================================================
utt_id         string, required    stable unique id: ``<corpus>/<path below the root>``
path           string, required    absolute path of the audio file
duration_s     float64             duration from the file header (prepare stage)
sample_rate    int32               native sample rate of the file (prepare stage)
label          string, nullable    class name; null for unlabeled pool rows
votes          list<string>        one entry per annotator (soft labels); null if unknown
speaker        string, required    speaker id, unique across corpora (``corpus/id``)
session        string, nullable    recording session (IEMOCAP ``Session1``...)
gender         string, nullable    ``F`` / ``M``
corpus         string, required    corpus name
split          string, nullable    ``train`` / ``val`` / ``test``
=============  ==================  ======================================================

Items are always named by ``utt_id``, never by their row position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from after_ray.errors import CorpusError
from after_ray.store.atomic import atomic_write_parquet

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("votes", pa.list_(pa.string())),
        pa.field("speaker", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("split", pa.string()),
    ]
)
COLUMNS = tuple(MANIFEST_SCHEMA.names)
SPLITS = ("train", "val", "test")


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Manifest rows (dicts) -> an Arrow table with the manifest schema, sorted by utt_id."""
    rows = sorted(rows, key=lambda r: r["utt_id"])
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    check_unique_ids(table)
    return table


def check_unique_ids(table: pa.Table) -> None:
    ids = table.column("utt_id").to_pylist()
    if len(ids) != len(set(ids)):
        dupes = [k for k, n in Counter(ids).items() if n > 1][:5]
        raise CorpusError(
            f"manifest has duplicate utt_id values, e.g. {dupes}: two files map to the same id; "
            "rename one of them or load the corpora as separate parts of a merged corpus"
        )


def write_manifest(table_or_rows: pa.Table | Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write atomically (``store.atomic``) so a crash never leaves half a manifest."""
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else rows_to_table(table_or_rows)
    table = table.select(list(COLUMNS)).cast(MANIFEST_SCHEMA)
    return atomic_write_parquet(table, path, what="the manifest")


def read_manifest(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"manifest {str(path)!r} not found: run `after-ray prepare --config ...` first"
        )
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise CorpusError(
            f"manifest {str(path)!r} lacks columns {missing}: it was not written by after-ray "
            "prepare; rebuild it"
        )
    return table.select(list(COLUMNS)).cast(MANIFEST_SCHEMA)


def class_names_of(table: pa.Table, classes: list[str] | None = None) -> list[str]:
    """The class order: the configured list, else the sorted labels present."""
    present = sorted({label for label in table.column("label").to_pylist() if label is not None})
    if classes is None:
        return present
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise CorpusError(
            f"labels {unknown} occur in the corpus but are not in corpus.classes {classes}: "
            "add them to corpus.classes or map them with corpus.label_map"
        )
    return list(classes)


@dataclass(frozen=True)
class SplitRows:
    """A manifest's rows as the stages use them: the pool, and the labeled val and test rows.

    The pool is every ``train`` row (labeled or not: its labels are what the oracle reveals);
    val and test keep only labeled rows, since they are scored against their labels.
    """

    rows: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    class_names: list[str]

    @classmethod
    def of(cls, table: pa.Table, classes: list[str] | None = None) -> SplitRows:
        rows = table.to_pylist()
        return cls(
            rows=rows,
            pool=[r for r in rows if r["split"] == "train"],
            val=[r for r in rows if r["split"] == "val" and r["label"] is not None],
            test=[r for r in rows if r["split"] == "test" and r["label"] is not None],
            class_names=class_names_of(table, classes),
        )

    def split(self, name: str) -> list[dict[str, Any]]:
        """Every row of split ``name`` (labeled or not)."""
        return [r for r in self.rows if r["split"] == name]


def describe(table: pa.Table) -> dict[str, Any]:
    """Counts and durations, per split and per label, for printing."""
    rows = table.select(["split", "label", "duration_s", "speaker"]).to_pylist()
    out: dict[str, Any] = {"utterances": len(rows)}
    out["hours"] = round(sum(r["duration_s"] or 0.0 for r in rows) / 3600.0, 3)
    out["speakers"] = len({r["speaker"] for r in rows})
    by_split: dict[str, Counter] = {}
    for r in rows:
        by_split.setdefault(r["split"] or "none", Counter())[r["label"] or "unlabeled"] += 1
    out["splits"] = {k: dict(sorted(v.items())) for k, v in sorted(by_split.items())}
    return out
