"""The prepare stage: corpus on disk -> checked manifest + quarantine table in the run directory.

Steps: load the corpus's rows (or build the synthesized demo corpus first), map labels to the
configured classes, probe every file once on Ray Data (duration, native rate, quality), quarantine
the files that cannot be used with the reason, assign speaker-independent splits, and write
``manifest.parquet`` atomically. Bad files never stop the stage; they are listed, and a summary
line says how many and where the table is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from after_ray.config.sections import Config, CorpusConfig
from after_ray.data import manifest, splits
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.labels import apply_label_map, resolve_label_map
from after_ray.data.quarantine import summary_line, write_quarantine
from after_ray.errors import CorpusError
from after_ray.store import layout
from after_ray.store.atomic import staged_directory

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    manifest_path: Path
    quarantine_path: Path
    n_rows: int
    n_quarantined: int
    summary: str
    description: dict[str, Any]


def build_synth_corpus(corpus: CorpusConfig, sample_rate: int) -> Path:
    """Build (or reuse, when already built with the same parameters) the demo corpus."""
    from after_ray.data.corpora.synth import synthesize_corpus

    s = corpus.synth
    return synthesize_corpus(
        corpus.resolved_root(),
        n_speakers=s.n_speakers,
        utterances_per_emotion=s.utterances_per_emotion,
        separation=s.separation,
        snr_db_range=(s.snr_db_min, s.snr_db_max),
        sample_rate=sample_rate,
        seed=s.seed,
        class_priors=s.class_priors or None,
        utterances_per_speaker=s.utterances_per_speaker if s.class_priors else None,
        duplicate_fraction=s.duplicate_fraction,
        low_quality_fraction=s.low_quality_fraction,
    )


def load_rows(corpus: CorpusConfig, sample_rate: int = 16000) -> list[dict[str, Any]]:
    """The corpus's manifest rows (no duration/sample rate yet), labels mapped to classes."""
    if corpus.name == "synth":
        root = build_synth_corpus(corpus, sample_rate)
        rows = load_corpus("csv", root, corpus_name="synth")
    elif corpus.name == "merged":
        from after_ray.data.corpora.merge import merge_corpora

        parts = [
            (load_corpus(p.name, p.root, **p.options), resolve_label_map(p.label_map))
            for p in corpus.parts
        ]
        rows = merge_corpora(parts)
    else:
        rows = load_corpus(corpus.name, corpus.resolved_root(), **corpus.options)
    mapping = resolve_label_map(corpus.label_map)
    if mapping is not None:
        rows = apply_label_map(rows, mapping)
    if corpus.classes is not None:
        # Rows labeled outside the class list cannot be trained on: drop them (and their votes
        # for other classes) the same way a label map would.
        rows = apply_label_map(rows, {c: c for c in corpus.classes})
    if not rows:
        raise CorpusError(
            f"corpus '{corpus.name}' gave no usable utterances after label mapping: check "
            "corpus.root, corpus.label_map and corpus.classes"
        )
    return rows


def prepare(config: Config) -> PrepareResult:
    """Run the prepare stage for ``config`` and return where everything was written."""
    from after_ray.distributed.backend import RayBackend

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(config.corpus, config.audio.sample_rate)
    cache = _probe_cache_dir(config, rows)
    if (cache / PROBE_DONE).is_file():
        # The same files (path, size, mtime) with the same audio settings were probed before,
        # e.g. by the other arms and seeds of a demo or sweep: their results are reused.
        good, quarantined = pq.read_table(cache / PROBE_GOOD), pq.read_table(cache / PROBE_BAD)
        log.info("prepare: probe results of %d files reused from %s", len(rows), cache)
    else:
        good, quarantined = RayBackend(config).probe(rows)
        with staged_directory(cache, what="the probe cache") as staging:
            pq.write_table(good, staging / PROBE_GOOD)
            pq.write_table(quarantined, staging / PROBE_BAD)
            (staging / PROBE_DONE).write_text("{}")
    good_rows = splits.assign_splits(good.to_pylist(), config.corpus.split)
    table = manifest.rows_to_table(good_rows)
    manifest_path = manifest.write_manifest(table, layout.manifest_path(run_dir))
    quarantine_path = write_quarantine(quarantined, run_dir / layout.QUARANTINE_FILE)
    summary = summary_line(quarantined.num_rows, len(rows), quarantine_path)
    log.info(summary)
    return PrepareResult(
        manifest_path=manifest_path,
        quarantine_path=quarantine_path,
        n_rows=table.num_rows,
        n_quarantined=quarantined.num_rows,
        summary=summary,
        description=manifest.describe(table),
    )


PROBE_CACHE_DIR = "_probe"
PROBE_GOOD, PROBE_BAD, PROBE_DONE = "probed.parquet", "quarantined.parquet", "_DONE"


def _probe_cache_dir(config: Config, rows: list[dict[str, Any]]) -> Path:
    """``<output_dir>/_probe/<key>``: the key hashes the audio settings and every row's
    path, size and modification time, so a changed or replaced file is probed again."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config.audio), sort_keys=True).encode())
    for row in sorted(rows, key=lambda r: r["utt_id"]):
        try:
            stat = os.stat(row["path"])
            signature = (stat.st_size, stat.st_mtime_ns)
        except OSError as exc:  # probing reports it; the key must still change when it is back
            signature = (-1, exc.errno)
        payload = json.dumps(
            [row["utt_id"], row["path"], *signature, row.get("label")], default=str
        )
        digest.update(payload.encode())
    return Path(config.run.output_dir).resolve() / PROBE_CACHE_DIR / digest.hexdigest()[:20]
