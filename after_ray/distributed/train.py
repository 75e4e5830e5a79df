"""TAPT and fine-tuning on Ray Train (``TorchTrainer``, DDP across workers, CPU or GPU).

The per-worker loops are thin: they rebuild the settings from plain dicts, build the model, feed
the torch-only loops of ``after_ray.training`` with batches streamed by Ray Data, and report
checkpoints with ``ray.train.report``. Everything a resumed worker needs comes back through
``ray.train.get_checkpoint()``; rerunning with the same ``RunConfig(name, storage_path)`` resumes
a killed run (Ray Train V2's rule), and ``FailureConfig(max_failures)`` restarts a worker group
that lost a worker.

Data: each worker streams its share of the manifest rows (``rows[rank::world]``) through a Ray
Data pipeline it builds per epoch (``audio_dataset(..., epoch=e)``), rather than one dataset
passed to the trainer: a per-epoch pipeline gives fresh training crops every epoch that are
still a pure function of (seed, epoch, utt_id), which is what makes a resumed run equal an
uninterrupted one. Decoding still streams block by block under Ray Data's backpressure.
``after-ray bench ingest`` measures this against ``datasets=`` + ``get_dataset_shard`` (README,
"Why workers build their own pipeline").
With uneven shards the ranks' places in their data differ, so a TAPT checkpoint holds every
rank's (``rank_positions``) and each resumes at its own; fine-tuning keeps the ranks' step
counts equal (``training.finetune._steps_on_every_rank``).

``diagnostics_dir`` (``run_tapt``, ``run_finetune``; off by default) makes every rank write what
it saw: see ``WorkerDiagnostics``. The multi-worker tests use it to prove the workers are real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from after_ray import faults
from after_ray.config.audio import AudioConfig
from after_ray.config.backbone import BackboneConfig, TaptConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.distributed.worker_audio import worker_audio
from after_ray.errors import AfterRayError, exception_chain
from after_ray.faults import failpoint
from after_ray.store.atomic import atomic_write_json, staged_directory

if TYPE_CHECKING:
    import torch

    from after_ray.models.classifier import SERClassifier
    from after_ray.training.finetune import FinetuneResult

log = logging.getLogger(__name__)

TAPT_STATE = "tapt_state.pt"
HF_MARKER = "config.json"
FINETUNE_RESULT = "finetune_result.json"
FINETUNE_STATE = "finetune_state.pt"


# ------------------------------------------------------------------------------ trainer plumbing
def scaling_config(ray_cfg) -> ScalingConfig:
    """Workers from ``ray.num_workers`` (0 = run the loop in the driver: Ray Train local mode)."""
    resources: dict[str, float] = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = ray_cfg.gpus_per_worker
    return ScalingConfig(
        num_workers=ray_cfg.num_workers,
        use_gpu=ray_cfg.use_gpu,
        resources_per_worker=resources if ray_cfg.num_workers > 0 else None,
    )


def run_config(name: str, storage_path: str | os.PathLike, ray_cfg) -> RunConfig:
    return RunConfig(
        name=name,
        storage_path=str(storage_path),
        failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )


def local_checkpoint_dir(storage_path: str | os.PathLike, name: str) -> Path:
    """Where rank 0 writes checkpoints before reporting them (see ``CheckpointWriter``).

    Next to Ray's own run folder for a local storage path; in the machine's temp dir when the
    storage is an object store URI (Ray uploads the reported copy there).
    """
    text = str(storage_path)
    if "://" in text:
        digest = hashlib.sha256(f"{text}/{name}".encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "after-ray-checkpoints" / f"{name}-{digest}"
    return Path(text) / name / "local_checkpoints"


def _common_loop_config(backbone, audio, ray_cfg, storage_path, name: str) -> dict:
    """What every worker loop needs besides its stage's settings (plain data for Ray)."""
    return {
        "backbone": dataclasses.asdict(backbone),
        "audio": dataclasses.asdict(audio),
        "torch_threads": ray_cfg.cpus_per_worker,
        "in_memory_max_hours": ray_cfg.in_memory_audio_max_hours,
        "local_checkpoint_dir": str(local_checkpoint_dir(storage_path, name)),
        # Failpoint settings for the crash tests (empty otherwise): workers do not inherit the
        # driver's environment.
        "faults": faults.snapshot(),
    }


def _fit(loop, loop_config: dict, *, name: str, storage_path, ray_cfg):
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(ray_cfg),
        run_config=run_config(name, storage_path, ray_cfg),
    )
    result = trainer.fit()
    if result.error is not None:
        # A message meant for the user (disk full while checkpointing, a damaged checkpoint)
        # reaches them as it is, not inside Ray's wrapper and its traceback.
        user_error = _user_facing_cause(result.error)
        if user_error is not None:
            raise user_error from result.error
        raise result.error
    return result


def _user_facing_cause(error: BaseException) -> AfterRayError | None:
    """The first ``AfterRayError`` in ``error``'s chain or in Ray's per-worker failures."""
    return next((e for e in exception_chain(error) if isinstance(e, AfterRayError)), None)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s training batches (its shuffle order and its crops).

    Each rank draws from its own stream, so two ranks never repeat one order; the stream is
    still a pure function of (seed, rank), which a resumed run needs. ``bench ingest`` uses it
    to iterate exactly what the loops below iterate.
    """
    return seed + 7919 * rank


def _rank_world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _device():
    import torch

    try:
        return ray.train.torch.get_device()
    except Exception:  # noqa: BLE001 - local mode without a process group
        return torch.device("cpu")


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and raw tensor bytes (equal digests: identical weights)."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        flat = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(flat.dtype).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WorkerDiagnostics:
    """What one training worker saw, for the multi-worker tests; off unless asked for.

    With ``run_tapt(..., diagnostics_dir=d)`` or ``run_finetune(..., diagnostics_dir=d)`` every
    rank writes ``d/rank-<rank>.json`` when its loop ends (a restarted worker group writes it
    again):

    - ``rank`` and ``world_size`` from Ray Train's context, ``torch_world_size`` from
      torch.distributed (1 without a process group);
    - ``batches``: per epoch of the rank's data source, the utt_ids of every batch it drew from
      it, in order (fine-tuning counts a batch drawn and then left out to keep the ranks in step);
    - ``digests``: ``state_digest`` of the weights: ``"initial"`` (as built and DDP-wrapped,
      before a resumed run loads its checkpoint), then after each TAPT checkpoint (keyed by
      step) or each fine-tuning epoch (keyed by epoch), and ``"final"`` (what the worker
      reports as its model).

    Disabled (no directory), every method leaves what it is given as it is.
    """

    def __init__(self, directory: str | os.PathLike | None, rank: int, world: int):
        from after_ray.training.ddp import rank_and_world

        self.path = Path(directory) / f"rank-{rank}.json" if directory else None
        self.record: dict[str, Any] = {
            "rank": rank,
            "world_size": world,
            "torch_world_size": rank_and_world()[1],
            "batches": {},
            "digests": {},
        }

    def batches(self, epoch: int, source: Iterable[dict]) -> Iterable[dict]:
        if self.path is None:
            return source
        drawn = self.record["batches"].setdefault(str(epoch), [])

        def recording() -> Iterable[dict]:
            for batch in source:
                drawn.append([str(u) for u in batch["utt_id"]])
                yield batch

        return recording()

    def digest(self, key: int | str, state_dict: dict[str, torch.Tensor]) -> None:
        if self.path is not None:
            self.record["digests"][str(key)] = state_digest(state_dict)

    def write(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.record, what="the worker diagnostics")


def _wrap_ddp(model, world: int):
    if world <= 1:
        return model
    return ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )


class CheckpointWriter:
    """Writes each reported checkpoint to a persistent directory first.

    Ray Train copies a reported checkpoint to ``storage_path``, and a restarted run gets it back
    from ``ray.train.get_checkpoint()``. Local mode (``num_workers=0``, the loop runs in the
    driver) persists nothing, so the same files are kept under ``root`` (the last two), and
    ``latest()`` finds them when the driver is restarted.
    """

    def __init__(self, root: str | os.PathLike, rank: int, keep: int = 2):
        self.root = Path(root)
        self.rank = rank
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def report(self, metrics: dict, files: dict[str, Any] | None) -> None:
        """All ranks call this (``ray.train.report`` is a barrier); rank 0 writes the files."""
        checkpoint = None
        if self.rank == 0 and files is not None:
            done = self._complete()
            seq = int(done[-1].name) + 1 if done else 0
            final = self.root / f"{seq:06d}"
            # Built aside and renamed into place: the checkpoints already written stay as they
            # are when this fails, and a resume starts from them.
            with staged_directory(final, what="a training checkpoint") as staging:
                for name, writer in files.items():
                    writer(staging / name)
            checkpoint = Checkpoint.from_directory(str(final))
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank == 0:
            for old in self._complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def resume_dir(writer: CheckpointWriter):
    """The checkpoint to resume from: Ray's (after a restart) or the local one, else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            yield Path(ckpt_dir)
        return
    yield writer.latest()


# ------------------------------------------------------------------------------------ TAPT
def tapt_worker_loop(loop_config: dict) -> dict:
    """``train_loop_per_worker`` for TAPT (see module docstring)."""
    import torch

    from after_ray.models.backbones import load_backbone
    from after_ray.store.torch_state import load_training_state, save_training_state
    from after_ray.training.tapt import save_tapt_result, tapt_loop

    faults.install(loop_config.get("faults"))
    tapt_cfg = TaptConfig(**loop_config["tapt"])
    backbone_cfg = BackboneConfig(**loop_config["backbone"])
    audio_cfg = AudioConfig(**loop_config["audio"])
    rank, world = _rank_world()
    torch.set_num_threads(max(1, int(loop_config.get("torch_threads", 1))))

    writer = CheckpointWriter(loop_config["local_checkpoint_dir"], rank)
    start_state = None
    with resume_dir(writer) as ckpt_dir:
        if ckpt_dir is not None and (ckpt_dir / "model" / HF_MARKER).is_file():
            # The run had already finished: report the final model again.
            writer.report(
                {"step": tapt_cfg.steps, "final": 1}, {"model": _copier(ckpt_dir, "model")}
            )
            return {"resumed_finished": True}
        if ckpt_dir is not None:
            start_state = _own_position(load_training_state(ckpt_dir / TAPT_STATE), rank, world)

    device = _device()
    model = load_backbone(backbone_cfg, for_pretraining=True).to(device)
    model = _wrap_ddp(model, world)
    diagnostics = WorkerDiagnostics(loop_config.get("diagnostics_dir"), rank, world)
    diagnostics.digest("initial", getattr(model, "module", model).state_dict())
    audio = worker_audio(
        loop_config["rows"][rank::world], audio_cfg, max_hours=loop_config["in_memory_max_hours"]
    )

    def batches(epoch: int):
        drawn = audio.train_batches(
            seed=rank_seed(tapt_cfg.seed, rank), epoch=epoch, batch_size=tapt_cfg.batch_size
        )
        return _with_failpoint(diagnostics.batches(epoch, drawn), "tapt_step")

    def on_checkpoint(step: int, state: dict) -> None:
        if world > 1:
            # All ranks checkpoint at the same step; rank 0 saves everyone's place.
            state["rank_positions"] = _gather_positions(state, world, device)
        diagnostics.digest(step, state["model"])
        loss = state.get("loss_history", [float("nan")])
        metrics = {"step": step, "loss": float(loss[-1]) if loss else float("nan")}
        writer.report(metrics, {TAPT_STATE: lambda path: save_training_state(state, path)})
        failpoint("tapt_checkpoint")

    def on_metrics(metrics: dict) -> None:
        if rank == 0:
            log.info(
                "tapt %s",
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
            )

    summary = tapt_loop(
        tapt_cfg,
        model,
        batches,
        start_state=start_state,
        on_checkpoint=on_checkpoint,
        on_metrics=on_metrics,
        device=device,
        rank=rank,
    )
    sampling_rate = audio_cfg.sample_rate
    writer.report(
        {"step": summary["steps"], "final": 1},
        {"model": lambda path: save_tapt_result(model, path, sampling_rate=sampling_rate)},
    )
    diagnostics.digest("final", getattr(model, "module", model).state_dict())
    diagnostics.write()
    return {
        "steps": summary["steps"],
        "loss_history": summary["loss_history"],
        "seconds": summary["seconds"],
        # > 0 when this attempt continued from a checkpoint (a restarted worker group or driver).
        "resumed_from_step": int(start_state["step"]) if start_state else 0,
    }


_POSITION_KEYS = ("epoch", "batch_in_epoch", "skipped_batches")


def _gather_positions(state: dict, world: int, device) -> list[list[int]]:
    """Every rank's place in its batch stream (``_POSITION_KEYS``), indexed by rank.

    A TAPT state holds the saving rank's place only; with uneven shards (or batches skipped on
    one rank for having nothing to mask) the other ranks' differ, and resuming them there would
    feed them other batches than an uninterrupted run.
    """
    import torch

    mine = torch.tensor([int(state[k]) for k in _POSITION_KEYS], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(every, mine)
    return [[int(v) for v in t.cpu().tolist()] for t in every]


def _own_position(start_state: dict, rank: int, world: int) -> dict:
    """``start_state`` with this rank's place in its batches, when the checkpoint has every
    rank's for this world size (otherwise the saving rank's, as before)."""
    positions = start_state.get("rank_positions")
    if world <= 1 or not positions or len(positions) != world:
        return start_state
    return {**start_state, **dict(zip(_POSITION_KEYS, positions[rank], strict=True))}


def _with_failpoint(batches, name: str):
    """Yield ``batches``, passing failpoint ``name`` after each one is consumed (mid-epoch)."""
    for batch in batches:
        yield batch
        failpoint(name)


def _copier(src_dir, name):
    def write(path: Path) -> None:
        shutil.copytree(Path(src_dir) / name, path)

    return write


def run_tapt(
    *,
    rows: list[dict],
    tapt: TaptConfig,
    backbone: BackboneConfig,
    audio: AudioConfig,
    ray_cfg,
    storage_path: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    diagnostics_dir: str | os.PathLike | None = None,
) -> dict:
    """TAPT over ``rows`` (utt_id + path) on Ray Train; the backbone is written to ``out_dir``.

    Re-running with the same ``name``/``storage_path`` after a crash resumes from the last
    checkpoint. Returns the rank-0 summary (steps, loss history, seconds). ``diagnostics_dir``:
    see ``WorkerDiagnostics``.
    """
    loop_config = {
        **_common_loop_config(backbone, audio, ray_cfg, storage_path, name),
        "diagnostics_dir": str(diagnostics_dir) if diagnostics_dir else None,
        "tapt": dataclasses.asdict(tapt),
        "rows": [{k: r.get(k) for k in ("utt_id", "path", "duration_s")} for r in rows],
    }
    result = _fit(
        tapt_worker_loop, loop_config, name=name, storage_path=storage_path, ray_cfg=ray_cfg
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        _install(Path(ckpt_dir) / "model", Path(out_dir))
    return result.return_value or {}


def _install(src: Path, dst: Path) -> None:
    """Copy a reported checkpoint's directory into place atomically."""
    with staged_directory(dst) as staging:
        shutil.copytree(src, staging, dirs_exist_ok=True)


# ------------------------------------------------------------------------------- fine-tuning
def finetune_worker_loop(loop_config: dict) -> dict:
    """``train_loop_per_worker`` for one fine-tuning run on the labeled set."""
    import torch

    from after_ray.store.torch_state import save_training_state
    from after_ray.training.finetune import finetune

    faults.install(loop_config.get("faults"))
    ft_cfg = FinetuneConfig(**loop_config["finetune"])
    audio_cfg = AudioConfig(**loop_config["audio"])
    class_names = list(loop_config["class_names"])
    label_to_index = {c: i for i, c in enumerate(class_names)}
    rank, world = _rank_world()
    torch.set_num_threads(max(1, int(loop_config.get("torch_threads", 1))))
    device = _device()

    writer = CheckpointWriter(loop_config["local_checkpoint_dir"], rank)
    finished, start_state = _finetune_resume_point(writer)
    if finished is not None:
        return finished

    model = _finetune_model(loop_config, ft_cfg, len(class_names), device, world)
    core = getattr(model, "module", model)
    diagnostics = WorkerDiagnostics(loop_config.get("diagnostics_dir"), rank, world)
    diagnostics.digest("initial", core.state_dict())
    train_batches, val_batches = _finetune_batches(
        loop_config, ft_cfg, audio_cfg, label_to_index, core, rank=rank, world=world, device=device
    )

    def recorded_train_batches(epoch: int) -> Iterable[dict]:
        return diagnostics.batches(epoch, train_batches(epoch))

    def on_epoch_end(record, _model) -> None:
        diagnostics.digest(record.epoch, core.state_dict())
        failpoint("finetune_epoch")

    def on_checkpoint(epoch: int, get_state) -> None:
        # Every epoch: a worker lost mid-run (or the driver, in local mode) resumes with the
        # next epoch instead of starting the round's fine-tuning again.
        state = get_state() if rank == 0 else None
        writer.report(
            {"epoch": epoch, "val_ua": state["history"][-1]["val_ua"] if state else None},
            {FINETUNE_STATE: lambda path: save_training_state(state, path)} if state else None,
        )
        failpoint("finetune_checkpoint")

    # Loss weights from the whole labeled set, not this worker's share of it.
    counts = [0.0] * len(class_names)
    for row in loop_config["train_rows"]:
        counts[label_to_index[row["label"]]] += 1.0
    result = finetune(
        ft_cfg,
        model,
        recorded_train_batches,
        val_batches,
        class_names,
        device=device,
        class_counts=counts,
        on_epoch_end=on_epoch_end,
        start_state=start_state,
        on_checkpoint=on_checkpoint,
    )
    summary = _finetune_summary(result, len(loop_config["train_rows"]), start_state)
    _report_finetune_result(writer, core, result, summary, class_names, ft_cfg)
    diagnostics.digest("final", result.best_state_dict)
    diagnostics.write()
    return summary


def _finetune_summary(result: FinetuneResult, n_train: int, start_state: dict | None) -> dict:
    """What ``run_finetune`` returns (plain JSON data)."""
    return {
        "best_epoch": result.best_epoch,
        "best_val_ua": result.best_val_ua,
        "best_val_report": result.best_val_report,
        "history": [dataclasses.asdict(r) for r in result.history],
        "class_weights": result.class_weights,
        "stopped_early": result.stopped_early,
        "timings": result.timings,
        # batch_size x grad_accumulation x workers, and the precision it trained in.
        "effective_batch": result.effective_batch,
        "precision": result.precision,
        "n_train": n_train,
        # > 0 when this attempt continued from a checkpoint (a restarted worker group or driver).
        "resumed_from_epoch": int(start_state["next_epoch"]) if start_state else 0,
    }


def _finetune_resume_point(writer: CheckpointWriter) -> tuple[dict | None, dict | None]:
    """(the summary of a run that had already finished, the state to resume from); None each
    when there is none. A finished run's model and summary are reported again."""
    from after_ray.store.torch_state import load_training_state

    with resume_dir(writer) as ckpt_dir:
        if ckpt_dir is not None and (ckpt_dir / FINETUNE_RESULT).is_file():
            # The run finished before the driver died: hand back the same result.
            summary = json.loads((ckpt_dir / FINETUNE_RESULT).read_text())
            writer.report(
                {"best_val_ua": summary["best_val_ua"]},
                {
                    "model": _copier(ckpt_dir, "model"),
                    FINETUNE_RESULT: lambda p: p.write_text(json.dumps(summary)),
                },
            )
            return summary, None
        if ckpt_dir is not None and (ckpt_dir / FINETUNE_STATE).is_file():
            return None, load_training_state(ckpt_dir / FINETUNE_STATE)
    return None, None


def _finetune_model(
    loop_config: dict, ft_cfg: FinetuneConfig, n_classes: int, device: torch.device, world: int
) -> torch.nn.Module:
    """The classifier to train, on ``device`` and DDP-wrapped: the warm-start directory's, or a
    new head on the configured backbone."""
    import torch

    from after_ray.models.backbones import load_backbone
    from after_ray.models.classifier import build_classifier
    from after_ray.models.classifier_io import load_classifier

    # A new head's initial weights come from torch's global RNG.
    torch.manual_seed(ft_cfg.seed)
    if loop_config.get("warm_start_dir"):
        model, _ = load_classifier(loop_config["warm_start_dir"])
        model.train()
    else:
        backbone = load_backbone(BackboneConfig(**loop_config["backbone"]), for_pretraining=False)
        model = build_classifier(backbone, n_classes, ft_cfg)
    model.to(device)
    return _wrap_ddp(model, world)


def _finetune_batches(
    loop_config: dict,
    ft_cfg: FinetuneConfig,
    audio_cfg: AudioConfig,
    label_to_index: dict[str, int],
    core: SERClassifier,
    *,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[Callable[[int], Iterable[dict]], Callable[[], Iterable[dict]]]:
    """``finetune``'s (train_batches, val_batches): this worker's share of the training rows and
    all of the validation rows, decoded per epoch, or served from the CNN feature cache."""
    from after_ray.training.finetune import make_cached_providers

    max_hours = loop_config["in_memory_max_hours"]
    train_audio = worker_audio(
        loop_config["train_rows"][rank::world],
        audio_cfg,
        label_to_index=label_to_index,
        max_hours=max_hours,
    )
    # Every worker validates on all of the validation set, so all select the same best epoch.
    val_audio = worker_audio(
        loop_config["val_rows"], audio_cfg, label_to_index=label_to_index, max_hours=max_hours
    )

    def train_batches(epoch: int) -> Iterable[dict]:
        return _with_failpoint(
            train_audio.train_batches(
                seed=rank_seed(ft_cfg.seed, rank), epoch=epoch, batch_size=ft_cfg.batch_size
            ),
            "finetune_step",
        )

    def val_batches() -> Iterable[dict]:
        return val_audio.eval_batches(batch_size=ft_cfg.batch_size)

    if not (ft_cfg.cache_features and core.feature_encoder_frozen):
        return train_batches, val_batches
    # A frozen CNN encoder gives the same features every epoch: compute them once per
    # utterance and train the rest of the model on the cache.
    cached_train, cached_val, cache_stats = make_cached_providers(
        ft_cfg,
        core,
        train_audio.eval_batches(batch_size=ft_cfg.batch_size),
        val_batches(),
        device=device,
        sampling_rate=audio_cfg.sample_rate,
    )
    log.info("fine-tune: CNN feature cache %s", cache_stats)
    return cached_train, cached_val


def _report_finetune_result(
    writer: CheckpointWriter,
    core: SERClassifier,
    result: FinetuneResult,
    summary: dict,
    class_names: list[str],
    ft_cfg: FinetuneConfig,
) -> None:
    """The final report: the best-epoch classifier and the summary, which a restarted run
    hands back without training again."""
    from after_ray.models.classifier_io import save_classifier

    writer.report(
        {"best_val_ua": result.best_val_ua},
        {
            "model": lambda path: save_classifier(
                core,
                path,
                class_names=class_names,
                finetune_cfg=ft_cfg,
                state_dict=result.best_state_dict,
            ),
            FINETUNE_RESULT: lambda path: path.write_text(json.dumps(summary, default=float)),
        },
    )


def run_finetune(
    *,
    train_rows: list[dict],
    val_rows: list[dict],
    class_names: list[str],
    finetune_cfg: FinetuneConfig,
    backbone: BackboneConfig,
    audio: AudioConfig,
    ray_cfg,
    storage_path: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    warm_start_dir: str | os.PathLike | None = None,
    diagnostics_dir: str | os.PathLike | None = None,
) -> dict:
    """Fine-tune on ``train_rows`` (utt_id, path, label[, votes]) with model selection on
    ``val_rows``; the best classifier is written to ``out_dir``. Returns the training summary.
    ``diagnostics_dir``: see ``WorkerDiagnostics``."""
    keep = ("utt_id", "path", "label", "votes", "duration_s")
    loop_config = {
        **_common_loop_config(backbone, audio, ray_cfg, storage_path, name),
        "diagnostics_dir": str(diagnostics_dir) if diagnostics_dir else None,
        "finetune": dataclasses.asdict(finetune_cfg),
        "class_names": list(class_names),
        "train_rows": [{k: r.get(k) for k in keep} for r in train_rows],
        "val_rows": [{k: r.get(k) for k in keep} for r in val_rows],
        "warm_start_dir": str(warm_start_dir) if warm_start_dir else None,
    }
    result = _fit(
        finetune_worker_loop, loop_config, name=name, storage_path=storage_path, ray_cfg=ray_cfg
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        summary = json.loads((Path(ckpt_dir) / FINETUNE_RESULT).read_text())
        _install(Path(ckpt_dir) / "model", Path(out_dir))
    return summary
