"""Audio on Ray Data: probe a manifest once (prepare), then stream model-ready batches.

- ``probe_audio``: one pass over the manifest rows in ``map_batches`` tasks; every file is decoded
  once to fill ``duration_s`` / native ``sample_rate`` and to run the quality checks. Bad files go
  to the quarantine table with a reason; nothing raises for a bad file.
- ``audio_dataset``: manifest -> decode -> mono -> resample -> crop (train) or chunk (score) ->
  normalise, lazily and streaming. Only the small manifest rows are shuffled; decoded audio is
  produced block by block under Ray Data's backpressure, so a corpus many times the object store
  flows through it (``tests/integration/test_audio_data.py`` checks this).
- ``PadCollate``: the ``iter_torch_batches`` collate class that pads a batch into the tensors of
  the audio-batch contract (input_values, attention_mask, lengths, utt_id, label_index,
  soft_target, chunk_index).

The per-batch functions (``probe_batch``, ``decode_batch``, ``pad_batch``) are plain module-level
functions on numpy dicts, unit-testable without Ray. Torch is imported only when collating.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from after_ray.config.audio import AudioConfig
from after_ray.data.audio import AudioProblem, Mode, load_for_model, probe_file
from after_ray.data.manifest import MANIFEST_SCHEMA
from after_ray.data.quarantine import QUARANTINE_SCHEMA
from after_ray.seeding import utterance_epoch_rng

log = logging.getLogger(__name__)

PROBE_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

# Manifest rows per decode task. A task's output is one block: 32 train crops of 4 s at 16 kHz
# are 8 MiB; 4 scored files of up to 60 s are at most 15 MiB. Small blocks keep many tasks in
# flight under the object-store budget and let backpressure act at a fine grain.
TRAIN_ROWS_PER_TASK = 32
SCORE_ROWS_PER_TASK = 4
PROBE_ROWS_PER_TASK = 32


# ---------------------------------------------------------------------------------------------
# manifest input


def as_table(rows_or_table: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Manifest rows (dicts) or a table -> a table; known manifest columns get their real types
    (an all-null ``votes`` column must still be ``list<string>``), extra keys are inferred."""
    if isinstance(rows_or_table, pa.Table):
        return rows_or_table
    rows = list(rows_or_table)
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name in MANIFEST_SCHEMA.names:
            columns[name] = pa.array(values, type=MANIFEST_SCHEMA.field(name).type)
        else:
            columns[name] = pa.array(values)
    if not names:
        return pa.table({"utt_id": pa.array([], pa.string()), "path": pa.array([], pa.string())})
    return pa.table(columns)


def _slices(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    # from_arrow(one table) is one block, i.e. one task: slice it so decoding runs in parallel.
    step = max(1, rows_per_block)
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]


# ---------------------------------------------------------------------------------------------
# probe (prepare stage)


def probe_batch(batch: dict[str, np.ndarray], cfg: AudioConfig) -> pa.Table:
    """``{utt_id, path}`` -> one ``PROBE_SCHEMA`` row per file (reason None when usable)."""
    out: dict[str, list] = {name: [] for name in PROBE_SCHEMA.names}
    for utt_id, path in zip(batch["utt_id"], batch["path"], strict=True):
        result = probe_file(str(path), cfg)
        out["utt_id"].append(str(utt_id))
        out["duration_s"].append(result.duration_s)
        out["sample_rate"].append(result.sample_rate)
        out["channels"].append(result.channels)
        out["reason"].append(result.reason)
        out["detail"].append(result.detail)
    return pa.table(out, schema=PROBE_SCHEMA)


def probe_audio(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]],
    cfg: AudioConfig,
    *,
    rows_per_task: int = PROBE_ROWS_PER_TASK,
) -> tuple[pa.Table, pa.Table]:
    """Probe every file once on Ray Data; returns ``(good, quarantined)``.

    ``good``: the input rows that passed, in input order, with ``duration_s`` and the file's
    native ``sample_rate`` filled in. ``quarantined``: ``QUARANTINE_SCHEMA`` rows (stage
    ``probe``) for the others. Requires Ray to be initialised (``ensure_ray``).
    """
    table = as_table(rows_or_table)
    for name in ("utt_id", "path"):
        if name not in table.column_names:
            raise ValueError(f"probe_audio needs a '{name}' column, got {table.column_names}")
    if table.num_rows == 0:
        return _with_probe_columns(table, None), QUARANTINE_SCHEMA.empty_table()
    keys = table.select(["utt_id", "path"])
    ds = ray.data.from_arrow(_slices(keys, rows_per_task)).map_batches(
        probe_batch,
        fn_kwargs={"cfg": cfg},
        batch_size=rows_per_task,
        batch_format="numpy",
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    probed = pa.concat_tables([p.cast(PROBE_SCHEMA) for p in parts]) if parts else None
    if probed is None or probed.num_rows != table.num_rows:
        got = 0 if probed is None else probed.num_rows
        raise RuntimeError(f"probe_audio: probed {got} of {table.num_rows} files")
    # Results come back in any order: align them to the input rows by utt_id.
    order = pc.index_in(table.column("utt_id"), value_set=probed.column("utt_id"))
    probed = probed.take(order)
    ok = pc.is_null(probed.column("reason"))
    good = _with_probe_columns(table.filter(ok), probed.filter(ok))
    bad = probed.filter(pc.invert(ok))
    quarantined = pa.table(
        {
            "utt_id": bad.column("utt_id"),
            "path": table.column("path").filter(pc.invert(ok)),
            "reason": bad.column("reason"),
            "detail": bad.column("detail"),
            "stage": pa.array(["probe"] * bad.num_rows, pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
    return good, quarantined


def _with_probe_columns(table: pa.Table, probed: pa.Table | None) -> pa.Table:
    for name, typ in (("duration_s", pa.float64()), ("sample_rate", pa.int32())):
        values = probed.column(name) if probed is not None else pa.nulls(table.num_rows, typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


# ---------------------------------------------------------------------------------------------
# decode (training / scoring stream)


def label_targets(
    labels: Iterable[Any] | None,
    votes: Iterable[Any] | None,
    label_to_index: Mapping[str, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``label_index`` int64 [B] (-1: unlabeled or not a class) and ``soft_target`` float32
    [B, C]: the vote distribution over known classes, else one-hot of the label, else zeros
    (an unlabeled row; consumers mask it with ``label_index == -1``)."""
    n_classes = max(label_to_index.values()) + 1 if label_to_index else 0
    labels = list(labels) if labels is not None else []
    votes = list(votes) if votes is not None else [None] * len(labels)
    index = np.full(len(labels), -1, dtype=np.int64)
    soft = np.zeros((len(labels), n_classes), dtype=np.float32)
    for i, (label, row_votes) in enumerate(zip(labels, votes, strict=True)):
        if label is not None and str(label) in label_to_index:
            index[i] = label_to_index[str(label)]
        counted = [
            label_to_index[str(v)]
            for v in (row_votes if row_votes is not None else [])
            if str(v) in label_to_index
        ]
        if counted:
            np.add.at(soft[i], counted, 1.0)
            soft[i] /= soft[i].sum()
        elif index[i] >= 0:
            soft[i, index[i]] = 1.0
    return index, soft


def decode_schema(mode: Mode, label_to_index: Mapping[str, int] | None, soft: bool) -> pa.Schema:
    fields = [
        pa.field("utt_id", pa.string()),
        pa.field("audio", pa.list_(pa.float32())),
        pa.field("length", pa.int64()),
    ]
    if mode == "score":
        fields.append(pa.field("chunk_index", pa.int32()))
    if label_to_index is not None:
        fields.append(pa.field("label_index", pa.int64()))
        if soft:
            fields.append(pa.field("soft_target", pa.list_(pa.float32())))
    return pa.schema(fields)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    cfg: AudioConfig,
    mode: Mode,
    seed: int,
    epoch: int | None,
    label_to_index: Mapping[str, int] | None,
    soft_targets: bool,
) -> pa.Table:
    """Manifest rows -> model-ready rows (one per crop, or one per chunk in score mode).

    Returns an Arrow table with an explicit schema so a batch whose files all failed is still a
    well-typed empty block. A file that cannot be decoded (e.g. deleted since prepare) is
    logged and dropped: one bad file never stops a training or scoring stream.
    """
    schema = decode_schema(mode, label_to_index, soft_targets)
    out: dict[str, list] = {name: [] for name in schema.names}
    utt_ids = [str(u) for u in batch["utt_id"]]
    if label_to_index is not None:
        labels = batch.get("label")
        label_index, soft = label_targets(
            labels if labels is not None else [None] * len(utt_ids),
            batch.get("votes"),
            label_to_index,
        )
    for i, (utt_id, path) in enumerate(zip(utt_ids, batch["path"], strict=True)):
        try:
            pieces = load_for_model(str(path), cfg, mode, utterance_epoch_rng(seed, epoch, utt_id))
        except AudioProblem as exc:
            log.warning("dropped %s at load: %s: %s", utt_id, exc.reason, exc.detail)
            continue
        except Exception as exc:  # noqa: BLE001 - never crash the stream on one file
            log.warning("dropped %s at load: %s: %s", utt_id, type(exc).__name__, exc)
            continue
        for k, piece in enumerate(pieces):
            out["utt_id"].append(utt_id)
            out["audio"].append(piece)
            out["length"].append(len(piece))
            if mode == "score":
                out["chunk_index"].append(k)
            if label_to_index is not None:
                out["label_index"].append(int(label_index[i]))
                if soft_targets:
                    out["soft_target"].append(soft[i])
    return _table(out, schema)


def _table(out: dict[str, list], schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        values = out[field.name]
        if field.type == pa.list_(pa.float32()):
            # Build list<float32> from one flat buffer + offsets: no per-sample Python objects.
            lengths = np.array([len(v) for v in values], dtype=np.int64)
            offsets = np.zeros(len(values) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            flat = np.concatenate(values, dtype=np.float32) if values else np.zeros(0, np.float32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def audio_dataset(
    manifest: pa.Table | str | Path | Iterable[Mapping[str, Any]],
    cfg: AudioConfig,
    *,
    mode: Mode = "train",
    seed: int = 0,
    label_to_index: Mapping[str, int] | None = None,
    shuffle: bool = False,
    epoch: int | None = 0,
    rows_per_task: int | None = None,
) -> ray.data.Dataset:
    """A lazy, streaming dataset of model-ready rows for the utterances in ``manifest``.

    Columns: ``utt_id``, ``audio`` (float32 list at ``cfg.sample_rate``, unpadded), ``length``;
    ``chunk_index`` in score mode; ``label_index`` when ``label_to_index`` is given, and
    ``soft_target`` when the manifest also has a ``votes`` column. Feed it to
    ``iter_torch_batches(collate_fn=PadCollate())`` or to a ``TorchTrainer``.

    Train crops are drawn from a per-row generator of ``(seed, epoch, utt_id)``, so they are the
    same on any worker and in any order. Ray Data re-runs the same pipeline every epoch, so a
    dataset built once repeats its crops (and its ``shuffle`` order) each epoch: build one per
    epoch with ``epoch=e`` (this is free, datasets are lazy), or pass ``epoch=None`` for fresh,
    non-reproducible randomness on every pass. ``shuffle`` permutes the manifest rows (cheap)
    before decoding; add ``local_shuffle_buffer_size`` when iterating for batch-level mixing.
    """
    if mode not in ("train", "score"):
        raise ValueError(f"mode must be 'train' or 'score', got {mode!r}")
    rows = rows_per_task or (TRAIN_ROWS_PER_TASK if mode == "train" else SCORE_ROWS_PER_TASK)
    shuffle_seed = None if epoch is None else [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]

    if isinstance(manifest, str | Path):
        # The manifest (ids, paths, labels: ~100 B a row) is read on the driver and handed to
        # Ray as in-memory blocks. ray.data.read_parquet + repartition cost 2.5-9 s per pass on
        # a 100-row manifest here (file listing, footer and repartition tasks) against 0.5 s for
        # from_arrow, and every epoch re-runs the read; only the decoded audio needs streaming.
        path = str(manifest)
        available = pq.ParquetDataset(path).schema.names
        table = pq.read_table(path, columns=_needed_columns(available, label_to_index))
    else:
        table = as_table(manifest)
    columns = _needed_columns(table.column_names, label_to_index)
    table = table.select(columns)
    if shuffle:
        order = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
        table = table.take(pa.array(order))
    ds = ray.data.from_arrow(_slices(table, rows))

    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "cfg": cfg,
            "mode": mode,
            "seed": seed,
            "epoch": epoch,
            "label_to_index": dict(label_to_index) if label_to_index is not None else None,
            "soft_targets": "votes" in columns,
        },
        batch_size=rows,
        batch_format="numpy",
    )


def in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds``, set to yield its rows in the order of its input (reproducible batches).

    A Dataset copies the global ``DataContext`` when it is created, so the setting must go on
    the dataset's own copy (``ds.context``): setting ``preserve_order`` on the global context
    after ``ds`` exists -- what this package once did -- changes nothing, and TAPT's batches
    came in whichever order the decode tasks finished (two runs of one seed parted at step 36).
    """
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds


def _needed_columns(available: list[str], label_to_index: Mapping[str, int] | None) -> list[str]:
    missing = [c for c in ("utt_id", "path") if c not in available]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; it has {available}")
    columns = ["utt_id", "path"]
    if label_to_index is not None:
        columns += [c for c in ("label", "votes") if c in available]
    return columns


# ---------------------------------------------------------------------------------------------
# collate


def pad_batch(batch: Mapping[str, Any], pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Numpy version of the batch contract: pad ``audio`` rows into ``input_values`` [B, T]."""
    pieces = [np.asarray(a, dtype=np.float32) for a in batch["audio"]]
    lengths = np.array([len(a) for a in pieces], dtype=np.int64)
    width = int(lengths.max()) if len(pieces) else 0
    if pad_to_multiple_of > 1:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    values = np.zeros((len(pieces), width), dtype=np.float32)
    mask = np.zeros((len(pieces), width), dtype=np.int64)
    for i, a in enumerate(pieces):
        values[i, : len(a)] = a
        mask[i, : len(a)] = 1
    out: dict[str, Any] = {
        "input_values": values,
        "attention_mask": mask,
        "lengths": lengths,
        "utt_id": [str(u) for u in batch["utt_id"]],
    }
    if "label_index" in batch:
        out["label_index"] = np.array(batch["label_index"], dtype=np.int64)  # a writable copy
    if "soft_target" in batch:
        rows = [np.array(s, dtype=np.float32) for s in batch["soft_target"]]
        out["soft_target"] = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    if "chunk_index" in batch:
        out["chunk_index"] = np.array(batch["chunk_index"], dtype=np.int64)
    return out


class PadCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=PadCollate())``: numpy rows -> padded torch tensors.

    Ray moves a collated batch to the target device only when every value is a tensor; ours
    carries ``utt_id`` as a list of strings, so Ray leaves it where it is. Pass ``device`` (e.g.
    ``ray.train.torch.get_device()`` inside a Train worker) to move the tensors here instead.
    """

    def __init__(self, *, pad_to_multiple_of: int = 1, device: Any = None):
        super().__init__()
        self.pad_to_multiple_of = pad_to_multiple_of
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        padded = pad_batch(batch, self.pad_to_multiple_of)
        out: dict[str, Any] = {}
        for key, value in padded.items():
            if isinstance(value, np.ndarray):
                tensor = torch.from_numpy(value)
                out[key] = tensor.to(self.device) if self.device is not None else tensor
            else:
                out[key] = value
        return out
