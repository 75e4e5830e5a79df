"""Merging several corpora into one manifest (``corpus.name: merged``, the paper's "Merged" set).

Each part is ``(rows, label_map or None)``: the map (e.g. ``FOUR_CLASS``) folds that corpus's
labels into the shared classes before the parts are joined. utt_ids and speakers are prefixed
with the corpus name, so parts never collide unless the same corpus is loaded twice, which is
refused.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from after_ray.data.corpora.labels import apply_label_map
from after_ray.errors import CorpusError

UNLABELED = "<unlabeled>"


def merge_corpora(
    parts: Iterable[tuple[list[dict[str, Any]], Mapping[str, str | None] | None]],
) -> list[dict[str, Any]]:
    """One list of rows, sorted by utt_id, from label-mapped parts; duplicate utt_ids refused."""
    merged: list[dict[str, Any]] = []
    owner: dict[str, int] = {}
    for index, (rows, mapping) in enumerate(parts):
        mapped = apply_label_map(rows, mapping) if mapping is not None else [dict(r) for r in rows]
        for row in mapped:
            first = owner.setdefault(row["utt_id"], index)
            if first != index:
                raise CorpusError(
                    f"merged corpus: utt_id {row['utt_id']!r} appears in part {first} and part "
                    f"{index}; each corpus may appear only once in corpus.parts"
                )
        merged.extend(mapped)
    ids = Counter(r["utt_id"] for r in merged)
    dupes = sorted(k for k, n in ids.items() if n > 1)
    if dupes:
        raise CorpusError(f"merged corpus: duplicate utt_ids within one part, e.g. {dupes[:5]}")
    return sorted(merged, key=lambda r: r["utt_id"])


def class_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """corpus -> label -> number of rows (unlabeled rows counted under ``<unlabeled>``)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        label = row.get("label")
        counts[row["corpus"]][label if label is not None else UNLABELED] += 1
    return {corpus: dict(sorted(c.items())) for corpus, c in sorted(counts.items())}


def format_class_counts(rows: Iterable[Mapping[str, Any]]) -> str:
    """A small text table of ``class_counts``: one line per corpus, plus a total line."""
    per_corpus = class_counts(rows)
    labels = sorted({label for c in per_corpus.values() for label in c})
    width = max([len("corpus"), len("total"), *(len(c) for c in per_corpus)])
    header = "corpus".ljust(width) + "".join(f" {label:>10}" for label in labels) + f" {'all':>8}"
    lines = [header]
    totals: Counter[str] = Counter()
    for corpus, counts in per_corpus.items():
        totals.update(counts)
        cells = "".join(f" {counts.get(label, 0):>10}" for label in labels)
        lines.append(corpus.ljust(width) + cells + f" {sum(counts.values()):>8}")
    cells = "".join(f" {totals.get(label, 0):>10}" for label in labels)
    lines.append("total".ljust(width) + cells + f" {sum(totals.values()):>8}")
    return "\n".join(lines)
