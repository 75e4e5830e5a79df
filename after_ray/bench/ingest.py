"""``after-ray bench ingest``: how Ray Train workers get their audio, ours against the Ray way.

The question (issue 16): should training workers read one Ray Data dataset handed to the trainer
(``TorchTrainer(datasets={"train": ds})`` + ``ray.train.get_dataset_shard``, which
``streaming_split``s it over the workers), instead of each worker building its own per-epoch
pipeline over its slice of the manifest, as ``tapt_worker_loop`` / ``finetune_worker_loop`` do?

One run synthesizes a small corpus (``bench.audio.write_bench_files``: stereo PCM16 at 44.1/48
kHz, longer than the training crop so crops are really random), starts Ray locally and runs a
2-worker ``TorchTrainer`` for ``epochs`` epochs per *way*, each way ``repeats`` times with the
same seed:

- ``ours``: every worker iterates ``StreamedAudio.train_batches`` (what ``worker_audio`` returns
  above ``ray.in_memory_audio_max_hours``) over ``rows[rank::world]`` with
  ``rank_seed(seed, rank)``: the loops' own code, a fresh ``audio_dataset(..., epoch=e)`` per
  epoch;
- ``ray``: one ``audio_dataset(rows, seed, epoch=0, shuffle=True)`` -- the same decode/crop map --
  passed as ``datasets={"train": ds}`` with ``DataConfig()``'s defaults, read every epoch with
  ``get_dataset_shard("train").iter_torch_batches(...)``;
- ``ray_ordered``: the same with ``execution_options.preserve_order=True``;
- ``ray_per_epoch``: what the Ray way needs for fresh seeded crops every epoch: one dataset per
  epoch (``audio_dataset(..., epoch=e)`` as ``train_e<e>``), ``preserve_order=True``.

Both sides collate with ``PadCollate`` and the same batch size, so the data source is the only
difference. Each worker records, per epoch, the utt_ids it got in order, a digest of each crop's
samples (:func:`crop_digest`) and the epoch's time (after a barrier, so the ranks start
together); rank 0 gathers the records over torch.distributed and returns them. The driver then
works out, per way: utterances per second; how many utt_ids moved rank or position between the
repeats; how many crops changed between the repeats; how many epoch-1 crops equal the epoch-0
crop of the same utterance; how many crops equal ``load_for_model`` with
``utterance_epoch_rng(seed', epoch', utt_id)`` (``ours``: ``rank_seed(seed, rank)`` and the epoch;
``ray`` and ``ray_ordered``: ``seed`` and epoch 0, the dataset's own); and whether a resumed run
could restart mid-epoch at a known position (the same utt_ids in the same places in every
repeat). ``bench_ingest.json`` in the run directory holds all of it, the rank records included.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.bench.audio import write_bench_files
from after_ray.bench.select import _machine  # the machine line every bench prints
from after_ray.config.audio import AudioConfig

__all__ = ["WAYS", "Way", "crop_digest", "ingest_worker_loop", "run_ingest_benchmark"]

RESULT_JSON = "bench_ingest.json"
MANIFEST_JSON = "manifest.json"
DEFAULT_OUT_DIR = Path("runs") / "bench-ingest"


@dataclass(frozen=True)
class Way:
    """One way of feeding the workers (see the module docstring)."""

    name: str
    title: str
    # "ours": every worker builds its own per-epoch pipeline; "ray": datasets= + get_dataset_shard.
    source: str
    preserve_order: bool = False
    # "ray" only: one dataset per epoch (audio_dataset(epoch=e)) rather than one for the run.
    per_epoch: bool = False

    def crop_key(self, seed: int, rank: int, epoch: int) -> tuple[int, int]:
        """The (seed, epoch) a crop of this way should have been drawn with."""
        from after_ray.distributed.train import rank_seed

        if self.source == "ours":
            return rank_seed(seed, rank), epoch
        # A dataset handed to the trainer cannot know the worker's rank; one built once for the
        # run has one epoch, 0, and Ray Data re-runs that same pipeline every epoch.
        return seed, epoch if self.per_epoch else 0


WAYS: dict[str, Way] = {
    w.name: w
    for w in (
        Way("ours", "ours: per-epoch pipeline over rows[rank::world]", "ours"),
        Way("ray", "Ray way: datasets= + get_dataset_shard", "ray"),
        Way("ray_ordered", "Ray way, preserve_order=True", "ray", preserve_order=True),
        Way(
            "ray_per_epoch",
            "Ray way, a dataset per epoch, preserve_order",
            "ray",
            preserve_order=True,
            per_epoch=True,
        ),
    )
}


def crop_digest(samples: Any) -> str:
    """SHA-256 (first 16 hex digits) of a crop's float32 samples: equal only for equal crops."""
    x = np.ascontiguousarray(np.asarray(samples, dtype=np.float32))
    return hashlib.sha256(x.tobytes()).hexdigest()[:16]


def _dataset_name(way: Way, epoch: int) -> str:
    return f"train_e{epoch}" if way.per_epoch else "train"


# ------------------------------------------------------------------------------- worker side
def ingest_worker_loop(config: dict) -> dict:
    """``train_loop_per_worker``: iterate ``config["epochs"]`` epochs of this way's batches and
    record what arrived; rank 0 returns every rank's record."""
    import ray.train
    import torch

    from after_ray.distributed.audio_data import PadCollate
    from after_ray.distributed.train import rank_seed
    from after_ray.distributed.worker_audio import StreamedAudio, worker_audio

    way = WAYS[config["way"]]
    cfg = AudioConfig(**config["audio"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    audio = None
    if way.source == "ours":
        # max_hours 0: the streamed path, the one that is Ray Data (below the configured
        # in_memory_audio_max_hours the loops decode once into memory, which is not).
        audio = worker_audio(config["rows"][rank::world], cfg, max_hours=0.0)
        if not isinstance(audio, StreamedAudio):
            raise RuntimeError(f"bench ingest: expected the streamed path, got {type(audio)}")
    epochs = []
    for epoch in range(int(config["epochs"])):
        if distributed:
            # Both ranks start the epoch together: its wall time is the slower rank's.
            torch.distributed.barrier()
        start = time.perf_counter()
        if audio is not None:
            batches = audio.train_batches(
                seed=rank_seed(int(config["seed"]), rank),
                epoch=epoch,
                batch_size=int(config["batch_size"]),
            )
        else:
            shard = ray.train.get_dataset_shard(_dataset_name(way, epoch))
            batches = shard.iter_torch_batches(
                batch_size=int(config["batch_size"]), collate_fn=PadCollate()
            )
        utt_ids: list[str] = []
        digests: list[str] = []
        for batch in batches:
            values = batch["input_values"].numpy()
            for i, utt_id in enumerate(batch["utt_id"]):
                utt_ids.append(str(utt_id))
                digests.append(crop_digest(values[i, : int(batch["lengths"][i])]))
        epochs.append(
            {
                "epoch": epoch,
                "utt_ids": utt_ids,
                "digests": digests,
                "seconds": time.perf_counter() - start,
            }
        )
    record = {"rank": rank, "world_size": world, "epochs": epochs}
    if not distributed:
        return {"ranks": [record]}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, record)
    return {"ranks": sorted(gathered, key=lambda r: r["rank"])}


# ------------------------------------------------------------------------------- driver side
def _fit(
    way: Way,
    repeat: int,
    rows: list[dict],
    cfg: AudioConfig,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    num_workers: int,
    storage: Path,
) -> dict:
    """One ``TorchTrainer.fit()`` of ``way``; returns its rank records and its wall time."""
    from ray.train import DataConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from after_ray.config.sections import RayConfig
    from after_ray.distributed.audio_data import audio_dataset
    from after_ray.distributed.train import scaling_config

    loop_config = {
        "way": way.name,
        "audio": asdict(cfg),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "rows": rows if way.source == "ours" else None,
    }
    datasets = None
    dataset_config = None
    if way.source == "ray":
        # The same decode/crop map as ours (audio_dataset), over every row, for Ray to split.
        keys = range(epochs) if way.per_epoch else [0]
        datasets = {
            _dataset_name(way, e): audio_dataset(
                rows, cfg, mode="train", seed=seed, epoch=e, shuffle=True
            )
            for e in keys
        }
        options = DataConfig.default_ingest_options()
        options.preserve_order = way.preserve_order
        dataset_config = DataConfig(execution_options=options)
    trainer = TorchTrainer(
        ingest_worker_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(RayConfig(num_workers=num_workers, cpus_per_worker=1)),
        run_config=RunConfig(name=f"{way.name}-{repeat}", storage_path=str(storage)),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    ranks = (result.return_value or {}).get("ranks")
    if not ranks or len(ranks) != num_workers:
        raise RuntimeError(f"bench ingest: {way.name} returned no record for every rank")
    return {"repeat": repeat, "fit_seconds": seconds, "ranks": ranks}


def _placements(run: dict, epoch: int) -> dict[str, tuple[int, int, str]]:
    """utt_id -> (rank, position in the rank's epoch, crop digest)."""
    out = {}
    for record in run["ranks"]:
        ep = record["epochs"][epoch]
        for position, (utt_id, digest) in enumerate(zip(ep["utt_ids"], ep["digests"], strict=True)):
            out[utt_id] = (record["rank"], position, digest)
    return out


class _ExpectedCrops:
    """The crop digest ``load_for_model`` gives for (seed, epoch, utt_id), computed once each."""

    def __init__(self, rows: list[dict], cfg: AudioConfig):
        self.paths = {r["utt_id"]: r["path"] for r in rows}
        self.cfg = cfg
        self.cache: dict[tuple[int, int, str], str] = {}

    def __call__(self, seed: int, epoch: int, utt_id: str) -> str:
        from after_ray.data.audio import load_for_model
        from after_ray.seeding import utterance_epoch_rng

        key = (seed, epoch, utt_id)
        if key not in self.cache:
            (piece,) = load_for_model(
                self.paths[utt_id], self.cfg, "train", utterance_epoch_rng(seed, epoch, utt_id)
            )
            self.cache[key] = crop_digest(piece)
        return self.cache[key]


def _warm_up(rows: list[dict], cfg: AudioConfig) -> None:
    """One untimed Ray Data pass over the corpus on the driver: starts Ray's worker processes
    and their imports, which the first timed fit would otherwise pay for alone (in a run without
    it, that fit's first epoch took 7 s and its second 1.4 s). The Train workers are new
    processes in every fit, for every way alike."""
    from after_ray.distributed.audio_data import audio_dataset, in_order

    ds = in_order(audio_dataset(rows, cfg, mode="train", seed=0, epoch=0))
    for _ in ds.iter_batches(batch_size=None):
        pass


def summarize_way(
    way: Way, runs: list[dict], rows: list[dict], expected: _ExpectedCrops, seed: int
) -> dict[str, Any]:
    """The figures of one way from its runs' rank records (see the module docstring)."""
    n_rows = len(rows)
    epochs = len(runs[0]["ranks"][0]["epochs"])
    delivered = 0
    seconds = 0.0
    epoch_seconds = []
    later_delivered = 0
    later_seconds = 0.0
    for run in runs:
        walls = [max(r["epochs"][e]["seconds"] for r in run["ranks"]) for e in range(epochs)]
        epoch_seconds.append(walls)
        seconds += sum(walls)
        counts = [sum(len(r["epochs"][e]["utt_ids"]) for r in run["ranks"]) for e in range(epochs)]
        delivered += sum(counts)
        # Epochs after the first: what a long training run sees once its pipeline is running.
        later_delivered += sum(counts[1:])
        later_seconds += sum(walls[1:])
    first = runs[0]
    per_epoch = [_placements(first, e) for e in range(epochs)]
    # Every other repeat of the same seed against the first: what moved, what changed.
    comparisons = []
    for other in runs[1:]:
        for e in range(epochs):
            theirs = _placements(other, e)
            counts = {"repeat": other["repeat"], "epoch": e, "rank": 0, "position": 0, "crop": 0}
            for utt_id in set(per_epoch[e]) | set(theirs):
                a, b = per_epoch[e].get(utt_id), theirs.get(utt_id)
                if a is None or b is None or a[0] != b[0]:
                    counts["rank"] += 1
                elif a[1] != b[1]:
                    counts["position"] += 1
                if a is not None and b is not None and a[2] != b[2]:
                    counts["crop"] += 1
            comparisons.append(counts)
    moved_rank = sum(c["rank"] for c in comparisons)
    moved_position = sum(c["position"] for c in comparisons)
    crops_changed = sum(c["crop"] for c in comparisons)
    # Fresh crops per epoch: an utterance's epoch-e crop against its epoch-0 crop, first repeat.
    repeated_crops = compared = 0
    for e in range(1, epochs):
        for utt_id, (_rank, _pos, digest) in per_epoch[e].items():
            if utt_id in per_epoch[0]:
                compared += 1
                repeated_crops += digest == per_epoch[0][utt_id][2]
    # Every crop of every repeat against the crop function with this way's (seed, epoch).
    crops_total = crops_as_computed = 0
    for run in runs:
        for record in run["ranks"]:
            for ep in record["epochs"]:
                key_seed, key_epoch = way.crop_key(seed, record["rank"], ep["epoch"])
                for utt_id, digest in zip(ep["utt_ids"], ep["digests"], strict=True):
                    crops_total += 1
                    crops_as_computed += digest == expected(key_seed, key_epoch, utt_id)
    missing = [n_rows - len(per_epoch[e]) for e in range(epochs)]
    reproducible = len(runs) > 1 and moved_rank == moved_position == crops_changed == 0
    return {
        "way": way.name,
        "title": way.title,
        "spec": asdict(way),
        "repeats": len(runs),
        "utterances_delivered": delivered,
        "epoch_seconds": epoch_seconds,
        "seconds": seconds,
        "utterances_per_s": delivered / seconds if seconds > 0 else float("nan"),
        "utterances_per_s_after_first_epoch": later_delivered / later_seconds
        if later_seconds > 0
        else float("nan"),
        "fit_seconds": [run["fit_seconds"] for run in runs],
        "missing_per_epoch_first_repeat": missing,
        "moved_rank": moved_rank,
        "moved_position": moved_position,
        "crops_changed_between_repeats": crops_changed,
        # Per (repeat, epoch) against the first repeat: utt_ids that moved rank, moved position
        # within their rank, and whose crop changed.
        "moved_per_repeat": comparisons,
        "epoch_crops_compared": compared,
        "epoch_crops_repeated": repeated_crops,
        "crops_total": crops_total,
        "crops_as_computed": crops_as_computed,
        "crop_key": "(rank_seed(seed, rank), epoch)"
        if way.source == "ours"
        else ("(seed, epoch)" if way.per_epoch else "(seed, 0)"),
        # A restart mid-epoch replays the first k batches and goes on (tapt_loop's resume): that
        # lands on the same utterances only if every repeat put them in the same places.
        "resume_at_known_position": reproducible,
    }


def run_ingest_benchmark(
    n_files: int = 128,
    seconds: float = 5.0,
    *,
    epochs: int = 2,
    repeats: int = 2,
    num_workers: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    ways: tuple[str, ...] = tuple(WAYS),
    out_dir: str | os.PathLike | None = None,
    num_cpus: int = 4,
    rates: tuple[int, ...] = (44100, 48000),
) -> dict[str, Any]:
    """Write the corpus, run every way ``repeats`` times, print the table, write the JSON.

    ``out_dir`` (default ``runs/bench-ingest``) is the run directory: ``corpus/`` (the WAV
    files), ``manifest.json`` (their rows, in manifest order), ``train/`` (Ray Train's storage)
    and ``bench_ingest.json``. ``num_cpus`` (local Ray only): logical CPUs, above the workers'
    so that Ray Data's decode tasks can run beside them.
    """
    import ray

    from after_ray.config.sections import RayConfig
    from after_ray.distributed.session import ensure_ray

    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        raise ValueError(f"unknown ways {unknown}; choose from {list(WAYS)}")
    if repeats < 2:
        raise ValueError("repeats must be at least 2: reproducibility is compared across them")
    if epochs < 2:
        raise ValueError("epochs must be at least 2: fresh crops are compared across them")
    cfg = AudioConfig()
    if seconds <= cfg.train_crop_s:
        raise ValueError(
            f"seconds must exceed the {cfg.train_crop_s:g} s training crop, or every crop is "
            "the whole file and fresh crops cannot be told from repeated ones"
        )
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = write_bench_files(out / "corpus", n_files, seconds, tuple(rates), seed=seed)
    for row in rows:
        row["duration_s"] = float(seconds)
    (out / MANIFEST_JSON).write_text(json.dumps(rows, indent=1) + "\n")

    load_before = os.getloadavg()
    started_ray = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=num_cpus, object_store_memory_mb=512))
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        _warm_up(rows, cfg)
        runs: dict[str, list[dict]] = {name: [] for name in ways}
        # Every way once, then every way again in the reverse order: a slow spell on the shared
        # machine lands on all ways rather than on one, and no way is always first or last.
        for repeat in range(repeats):
            for name in ways if repeat % 2 == 0 else tuple(reversed(ways)):
                runs[name].append(
                    _fit(
                        WAYS[name],
                        repeat,
                        rows,
                        cfg,
                        seed=seed,
                        epochs=epochs,
                        batch_size=batch_size,
                        num_workers=num_workers,
                        storage=(out / "train").resolve(),
                    )
                )
    finally:
        if started_ray:
            ray.shutdown()

    expected = _ExpectedCrops(rows, cfg)
    result = {
        "n_files": n_files,
        "seconds_per_file": seconds,
        "rates": list(rates),
        "crop_s": cfg.train_crop_s,
        "sample_rate": cfg.sample_rate,
        "epochs": epochs,
        "repeats": repeats,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "seed": seed,
        "ray_cpus": cpus,
        "machine": _machine(),
        "load_average": [load_before[0], os.getloadavg()[0]],
        "out_dir": str(out),
        "manifest": str(out / MANIFEST_JSON),
        "ways": {
            name: summarize_way(WAYS[name], runs[name], rows, expected, seed) for name in ways
        },
        "runs": runs,
    }
    (out / RESULT_JSON).write_text(json.dumps(result, indent=1) + "\n")
    print(format_result(result), flush=True)
    return result


TABLE_HEADER = (
    "| way | utt/s | utt/s after epoch 0 | epoch s (per repeat) | fit s | missing/epoch "
    "| moved rank | moved position | crops changed between repeats | epoch-1 crops = epoch-0 "
    "| crops = f(seed', epoch', utt_id) | resume at known position |"
)


def format_result(r: dict[str, Any]) -> str:
    """The table ``after-ray bench ingest`` prints (every figure is in the JSON as well)."""
    lines = [
        f"bench ingest: {r['n_files']} files x {r['seconds_per_file']:g} s "
        f"({'/'.join(map(str, r['rates']))} Hz stereo), {r['crop_s']:g} s crops, "
        f"{r['num_workers']} workers x 1 CPU, batch {r['batch_size']}, {r['epochs']} epochs, "
        f"{r['repeats']} repeats of seed {r['seed']}; Ray {r['ray_cpus']} CPUs; {r['machine']}; "
        f"load {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}",
        TABLE_HEADER,
        "|" + "---|" * TABLE_HEADER.count(" | ") + "---|",
    ]
    for w in r["ways"].values():
        epoch_s = "; ".join("/".join(f"{s:.2f}" for s in walls) for walls in w["epoch_seconds"])
        lines.append(
            f"| {w['way']} | {w['utterances_per_s']:.1f} | "
            f"{w['utterances_per_s_after_first_epoch']:.1f} | {epoch_s} | "
            f"{'/'.join(f'{s:.1f}' for s in w['fit_seconds'])} | "
            f"{'/'.join(map(str, w['missing_per_epoch_first_repeat']))} | "
            f"{w['moved_rank']} | {w['moved_position']} | {w['crops_changed_between_repeats']} | "
            f"{w['epoch_crops_repeated']}/{w['epoch_crops_compared']} | "
            f"{w['crops_as_computed']}/{w['crops_total']} {w['crop_key']} | "
            f"{'yes' if w['resume_at_known_position'] else 'no'} |"
        )
    lines.append(f"results: {Path(r['out_dir']) / RESULT_JSON}")
    return "\n".join(lines)
