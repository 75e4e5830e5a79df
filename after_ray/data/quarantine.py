"""The quarantine table: files that cannot be used, with the reason, so none is silently dropped.

Schema (``QUARANTINE_SCHEMA``), one row per rejected file:

=======  ======  ==========================================================================
column   type    meaning
=======  ======  ==========================================================================
utt_id   string  the manifest id the file would have had
path     string  the file
reason   string  a stable code from ``after_ray.data.audio.REASONS`` (missing_file, unreadable, ...)
detail   string  the specifics: OS / libsndfile message, measured duration or level
stage    string  where it was caught: ``probe`` (prepare stage) or ``load`` (training/scoring)
=======  ======  ==========================================================================

It is written as Parquet (for code) and a CSV twin next to it (for people). Files that break
after prepare (deleted, truncated, overwritten) are dropped by the training and scoring streams
with a warning; ``quarantine_lost_files`` probes such files again and appends them with stage
``load``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from after_ray.errors import CorpusError
from after_ray.store.atomic import atomic_write, atomic_write_parquet

if TYPE_CHECKING:
    from after_ray.config.audio import AudioConfig

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("stage", pa.string()),
    ]
)
QUARANTINE_COLUMNS = tuple(QUARANTINE_SCHEMA.names)


def quarantine_table(rows: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts or a table with at least these columns) -> a table with the schema."""
    if isinstance(rows, pa.Table):
        missing = [c for c in QUARANTINE_COLUMNS if c not in rows.column_names]
        for name in missing:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, pa.string()))
        return rows.select(list(QUARANTINE_COLUMNS)).cast(QUARANTINE_SCHEMA)
    rows = list(rows)
    columns = {name: [row.get(name) for row in rows] for name in QUARANTINE_COLUMNS}
    return pa.table(columns, schema=QUARANTINE_SCHEMA)


def csv_twin(path: str | Path) -> Path:
    return Path(path).with_suffix(".csv")


def write_quarantine(rows: pa.Table | Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the table (possibly empty) as Parquet plus a ``.csv`` twin; returns the Parquet path."""
    table = quarantine_table(rows)
    path = Path(path)
    atomic_write_parquet(table, path, what="the quarantine table")
    atomic_write(
        csv_twin(path), lambda handle: pacsv.write_csv(table, handle), what="the quarantine table"
    )
    return path


def read_quarantine(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"quarantine table {str(path)!r} not found: run `after-ray prepare --config ...` first"
        )
    return quarantine_table(pq.read_table(path))


def append_quarantine(rows: pa.Table | Iterable[Mapping[str, Any]], path: str | Path) -> pa.Table:
    """Add ``rows`` to the table at ``path`` (created when absent) and rewrite it with its CSV
    twin; a file (``utt_id``) already listed keeps its first row, so repeating a call is a no-op.
    Returns the whole table."""
    new = quarantine_table(rows)
    path = Path(path)
    old = read_quarantine(path) if path.is_file() else QUARANTINE_SCHEMA.empty_table()
    listed = set(old.column("utt_id").to_pylist())
    fresh = [r for r in new.to_pylist() if r["utt_id"] not in listed]
    if not fresh and path.is_file():
        return old
    table = pa.concat_tables([old, quarantine_table(fresh)])
    write_quarantine(table, path)
    return table


def quarantine_lost_files(
    rows: Iterable[Mapping[str, Any]], cfg: AudioConfig, path: str | Path, *, stage: str = "load"
) -> list[str]:
    """Files that passed prepare but a training or scoring stream dropped (deleted, truncated,
    overwritten since): probe them again on the driver (a few files, no Ray) and add the ones
    that fail to the quarantine table at ``path`` with ``stage``. Returns their ``utt_id``s.

    A file that probes fine again (a transient read error) is not quarantined; the caller
    decides what to do with it for this pass (it has no scores either way).
    """
    from after_ray.data.audio import probe_file

    found = []
    for row in rows:
        result = probe_file(row["path"], cfg)
        if result.reason is not None:
            found.append(
                {
                    "utt_id": row["utt_id"],
                    "path": row["path"],
                    "reason": result.reason,
                    "detail": result.detail,
                    "stage": stage,
                }
            )
    if found:
        append_quarantine(found, path)
    return [r["utt_id"] for r in found]


def reason_counts(table: pa.Table) -> dict[str, int]:
    return dict(Counter(table.column("reason").to_pylist()))


def summary_line(
    n_quarantined: int,
    n_total: int,
    path: str | Path,
    reasons: Mapping[str, int] | None = None,
) -> str:
    """One line for logs and the CLI, e.g.
    ``quarantine: 7 of 960 files (0.7%) -> runs/x/quarantine.parquet (reasons: silent 3, unreadable 4)``.

    Without ``reasons``, the counts are read from the table at ``path`` when it exists.
    """
    if reasons is None and n_quarantined and Path(path).is_file():
        reasons = reason_counts(read_quarantine(path))
    share = 100.0 * n_quarantined / n_total if n_total else 0.0
    line = f"quarantine: {n_quarantined} of {n_total} files ({share:.1f}%) -> {path}"
    if reasons:
        listed = ", ".join(f"{name} {count}" for name, count in sorted(reasons.items()))
        line += f" (reasons: {listed})"
    return line
