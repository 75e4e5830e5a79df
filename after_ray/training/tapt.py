"""The per-worker TAPT loop: continue a backbone's self-supervised objective on unlabeled audio.

No Ray here: the Ray Train wrapper (``after_ray/distributed/``) calls ``tapt_loop`` inside
``train_loop_per_worker`` with the worker's dataset shard as ``batches`` and callbacks that report
metrics and checkpoints. Run it in a plain process for a single-machine run or a test.

Exact resumption. Everything random in a step (span mask, negatives, dropout, Gumbel noise) is
drawn from generators seeded by ``(seed, worker rank, step)``, so the checkpoint needs only the
step counter, not generator states, and a resumed run equals an uninterrupted one on every rank.
Batches are replayed by position (epoch, batch within epoch), which reproduces the data order
when the batch source is deterministic (a list, a seeded loader); a streaming source that
reshuffles on its own just continues.

Under DistributedDataParallel, pass the wrapped model: the loss functions call the wrapper (so
gradients are all-reduced) and reach ``model.module`` only for attributes. The HuBERT/WavLM head
lives outside the wrapper; its gradients are all-reduced here, and the k-means centroids are
fitted on rank 0 and broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Wav2Vec2ForPreTraining

from after_ray.config.backbone import TaptConfig
from after_ray.models.backbones import save_backbone, unwrap
from after_ray.models.masking import compute_span_mask, generator_for, sample_negatives
from after_ray.models.pretraining import (
    ClusterTargets,
    MaskedPredictionHead,
    frame_lengths,
    hubert_pretraining_loss,
    num_frames,
    resolve_feature_layer,
    wav2vec2_pretraining_loss,
)
from after_ray.seeding import seedsequence_seed
from after_ray.training.ddp import rank_and_world
from after_ray.training.precision import autocast_for, resolve_precision

# Independent random streams derived from (seed, rank, step, stream).
_MASK_STREAM = 0
_TORCH_STREAM = 1
_HEAD_INIT_STREAM = 2
_KMEANS_STREAM = 3
STATE_FORMAT = 1
# Give up when this many batches in a row have nothing to mask (all shorter than two frames).
_MAX_CONSECUTIVE_EMPTY = 100

BatchSource = Iterable[dict[str, Any]] | Callable[[int], Iterable[dict[str, Any]]]


def objective_of(model: nn.Module) -> str:
    """``"wav2vec2"`` (contrastive, needs Wav2Vec2ForPreTraining) or ``"masked_prediction"``."""
    return "wav2vec2" if isinstance(unwrap(model), Wav2Vec2ForPreTraining) else "masked_prediction"


def lr_factor(step: int, cfg: TaptConfig) -> float:
    """Multiplier of ``cfg.lr`` during optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress


def gumbel_temperature(step: int, cfg: TaptConfig) -> float:
    """Geometric annealing from start (first step) to end (last step), fairseq's shape."""
    fraction = step / max(1, cfg.steps - 1)
    start, end = cfg.gumbel_temperature_start, cfg.gumbel_temperature_end
    return start * (end / start) ** min(1.0, fraction)


@dataclasses.dataclass
class TaptState:
    """Everything a TAPT run carries between steps. ``state_dict()`` is what checkpoints hold."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    # Position in the batch source: epoch number and batches already drawn in that epoch.
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_batches: int = 0
    # Masked prediction only: the prediction head and the frozen cluster-target teacher.
    head: MaskedPredictionHead | None = None
    targets: ClusterTargets | None = None
    loss_history: list[float] = dataclasses.field(default_factory=list)

    def state_dict(self, cfg: TaptConfig) -> dict[str, Any]:
        """A CPU copy of everything needed to resume exactly (safe to keep while training)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "objective": objective_of(self.model),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_batches": self.skipped_batches,
            "model": _to_cpu(unwrap(self.model).state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scheduler": _to_cpu(self.scheduler.state_dict()),
            # Randomness is derived per step from these; no generator state needs saving.
            "rng": {"scheme": "derived(seed, rank, step)", "seed": cfg.seed},
            "tapt_config": dataclasses.asdict(cfg),
            "loss_history": list(self.loss_history),
        }
        if self.head is not None and self.targets is not None:
            state["head"] = _to_cpu(self.head.state_dict())
            state["targets"] = _to_cpu(self.targets.state_dict())
            state["targets_layer"] = self.targets.layer
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown TAPT state format {state.get('format')!r}")
        if state["objective"] != objective_of(self.model):
            raise ValueError(
                f"the TAPT state is for a {state['objective']} objective, the model is trained "
                f"with {objective_of(self.model)}: resume with the same backbone"
            )
        unwrap(self.model).load_state_dict(state["model"])
        if self.head is not None and self.targets is not None:
            self.head.load_state_dict(state["head"])
            self.targets.load_state_dict(state["targets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped_batches = int(state["skipped_batches"])
        self.loss_history = list(state.get("loss_history", []))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class _BatchStream:
    """Cycles a batch source epoch after epoch, and can resume at (epoch, batch in epoch)."""

    def __init__(self, source: BatchSource, epoch: int, skip: int) -> None:
        self.source = source
        self.epoch = epoch
        self.batch_in_epoch = 0
        self._iterator = self._open(epoch)
        for _ in range(skip):
            self.next()

    def _open(self, epoch: int) -> Iterator[dict[str, Any]]:
        if callable(self.source) and not hasattr(self.source, "__iter__"):
            return iter(self.source(epoch))
        return iter(self.source)

    def next(self) -> dict[str, Any]:
        for attempt in range(2):
            try:
                batch = next(self._iterator)
            except StopIteration:
                if attempt == 1 or self._iterator is self.source:
                    raise ValueError(
                        "the TAPT batch source gave no batches"
                        if attempt == 1
                        else "the TAPT batches are a one-shot iterator and ran out; pass a "
                        "re-iterable (a list, a DataLoader, Ray's iter_torch_batches(...)) or a "
                        "callable epoch -> iterable"
                    ) from None
                self.epoch += 1
                self.batch_in_epoch = 0
                self._iterator = self._open(self.epoch)
                continue
            self.batch_in_epoch += 1
            return batch
        raise AssertionError("unreachable")


def _batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    values = torch.as_tensor(batch["input_values"], dtype=torch.float32)
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        attention = torch.as_tensor(batch["attention_mask"]).to(torch.long)
    else:  # no mask given: every sample is real
        attention = torch.ones(values.shape, dtype=torch.long)
    moved = {
        "input_values": values.to(device, non_blocking=True),
        "attention_mask": attention.to(device, non_blocking=True),
    }
    if "lengths" in batch and batch["lengths"] is not None:
        moved["lengths"] = torch.as_tensor(batch["lengths"]).to(torch.long).cpu()
    else:
        moved["lengths"] = attention.sum(-1).cpu()
    return moved


def _rng_fork(device: torch.device) -> contextlib.AbstractContextManager[None]:
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if (device.type == "cuda")
        else []
    )
    return torch.random.fork_rng(devices=devices)


def build_optimizer(
    cfg: TaptConfig, parameters: Iterable[nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases, norms and 1-D parameters) + warm-up/decay schedule."""
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def _prepare_masked_prediction(
    cfg: TaptConfig,
    model: nn.Module,
    stream_source: BatchSource,
    device: torch.device,
    start_state: dict[str, Any] | None,
) -> tuple[MaskedPredictionHead, ClusterTargets]:
    core = unwrap(model)
    world = rank_and_world()[1]
    if start_state is not None:
        layer = int(start_state["targets_layer"])
        targets = ClusterTargets.empty_like(core, layer, cfg.hubert_num_clusters)
    else:
        layer = resolve_feature_layer(core, cfg.hubert_feature_layer)
        kmeans_batches = _take(_BatchStream(stream_source, 0, 0), cfg.hubert_kmeans_batches)
        targets = ClusterTargets.fit(
            core,
            [_batch_to_device(b, device) for b in kmeans_batches],
            layer,
            cfg.hubert_num_clusters,
            seedsequence_seed(cfg.seed, _KMEANS_STREAM),
            iters=cfg.hubert_kmeans_iters,
            max_frames=cfg.hubert_kmeans_max_frames,
        )
        if world > 1:  # every rank must predict the same clusters: use rank 0's
            centroids = targets.centroids.to(device)
            torch.distributed.broadcast(centroids, src=0)
            targets.centroids.copy_(centroids.to(targets.centroids.device))
    targets.to(device)
    # Same initial head on every rank (the seed does not depend on the rank).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seedsequence_seed(cfg.seed, _HEAD_INIT_STREAM))
        head = MaskedPredictionHead(
            core.config.hidden_size,
            cfg.hubert_num_clusters,
            proj_dim=cfg.hubert_proj_dim,
            logit_temperature=cfg.hubert_logit_temperature,
        )
    return head.to(device), targets


def _take(stream: _BatchStream, n: int) -> list[dict[str, Any]]:
    batches = []
    first_epoch = stream.epoch
    while len(batches) < n:
        batch = stream.next()
        if stream.epoch != first_epoch:
            break  # fewer batches than asked for: one pass is enough
        batches.append(batch)
    return batches


def tapt_loop(
    cfg: TaptConfig,
    model: nn.Module,
    batches: BatchSource,
    *,
    start_state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    device: torch.device | str | None = None,
    rank: int | None = None,
    replay_batches: bool = True,
) -> dict[str, Any]:
    """Run TAPT until ``cfg.steps`` optimizer steps are done; the model is trained in place.

    ``model``: ``Wav2Vec2ForPreTraining`` (contrastive objective) or a bare HuBERT/WavLM/wav2vec2
    encoder (masked prediction of cluster ids), optionally DDP-wrapped, already on ``device``
    when wrapped. ``batches``: a re-iterable of batches in the audio-batch contract
    (``input_values``, ``attention_mask``, ``lengths``), cycled as often as needed, or a callable
    ``epoch -> iterable``. ``start_state``: a dict given earlier to ``on_checkpoint``; training
    resumes after its step. ``on_checkpoint(step, state)`` is called every
    ``cfg.checkpoint_every`` steps and after the last step; ``on_metrics(metrics)`` every
    ``cfg.log_every`` steps and after the last. ``rank`` defaults to torch.distributed's rank.
    ``replay_batches=False`` skips re-reading the batches a resumed run had already consumed
    (for streaming sources whose order is not reproducible anyway).

    Returns a summary: steps, loss history, last metrics, wall seconds, skipped batches.
    """
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid TAPT settings: " + "; ".join(problems))
    if device is None:
        device = next(model.parameters()).device
    run = _start_run(cfg, model, batches, torch.device(device), rank, start_state)
    state = run.state
    skip = state.batch_in_epoch if replay_batches else 0
    stream = _BatchStream(batches, state.epoch, skip)
    # Feature masking (SpecAugment over channels) is not part of either objective, and
    # transformers draws it from NumPy's global RNG: off during TAPT, restored afterwards.
    saved_feature_mask_prob = run.core.config.mask_feature_prob
    run.core.config.mask_feature_prob = 0.0

    started = time.perf_counter()
    model.train()
    if state.head is not None:
        state.head.train()
    try:
        last_metrics = _run_steps(run, stream, on_checkpoint, on_metrics)
    finally:
        run.core.config.mask_feature_prob = saved_feature_mask_prob

    return {
        "steps": state.step,
        "objective": run.objective,
        "loss_history": list(state.loss_history),
        "last_metrics": last_metrics,
        "seconds": time.perf_counter() - started,
        "skipped_batches": state.skipped_batches,
        "state": state,
    }


@dataclasses.dataclass
class _Run:
    """What every step of one ``tapt_loop`` call works with; only ``state`` changes."""

    cfg: TaptConfig
    state: TaptState
    core: nn.Module  # the model without its DDP wrapper
    objective: str
    device: torch.device
    rank: int
    world: int
    trainable: list[nn.Parameter]
    autocast: contextlib.AbstractContextManager[Any]


def _start_run(
    cfg: TaptConfig,
    model: nn.Module,
    batches: BatchSource,
    device: torch.device,
    rank: int | None,
    start_state: dict[str, Any] | None,
) -> _Run:
    """Model on ``device``, masked-prediction head and targets, optimizer, resumed state."""
    if rank is None:
        rank = rank_and_world()[0]
    _, world = rank_and_world()
    core = unwrap(model)
    model.to(device)
    objective = objective_of(model)

    head: MaskedPredictionHead | None = None
    targets: ClusterTargets | None = None
    if objective == "masked_prediction":
        head, targets = _prepare_masked_prediction(cfg, model, batches, device, start_state)
    parameters = list(model.parameters()) + (list(head.parameters()) if head else [])
    optimizer, scheduler = build_optimizer(cfg, parameters)
    state = TaptState(model, optimizer, scheduler, head=head, targets=targets)
    if start_state is not None:
        state.load_state_dict(start_state)
    autocast = autocast_for(resolve_precision(cfg.precision, device), device)
    trainable = [p for p in parameters if p.requires_grad]
    return _Run(cfg, state, core, objective, device, rank, world, trainable, autocast)


@dataclasses.dataclass
class _LogWindow:
    """The steps since the last ``on_metrics`` call, and the losses not yet copied to the host
    (one device sync per log line or checkpoint, not per step)."""

    steps: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    pending_losses: list[torch.Tensor] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    utterances: int = 0
    samples: int = 0

    def add(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        stats: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> None:
        self.steps.append({"loss": loss.detach(), "grad_norm": grad_norm.detach(), **stats})
        self.pending_losses.append(loss.detach())
        self.utterances += int(batch["input_values"].shape[0])
        self.samples += int(batch["lengths"].sum())

    def reset(self) -> None:
        """Start the next window (pending losses are flushed by whoever reads them)."""
        self.steps = []
        self.started = time.perf_counter()
        self.utterances = self.samples = 0


def _run_steps(
    run: _Run,
    stream: _BatchStream,
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None,
    on_metrics: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Optimizer steps until ``cfg.steps``, with the callbacks; returns the last metrics."""
    cfg, state = run.cfg, run.state
    window = _LogWindow()
    last_metrics: dict[str, Any] = {}
    empty_in_a_row = 0
    while state.step < cfg.steps:
        batch = _batch_to_device(stream.next(), run.device)
        state.epoch, state.batch_in_epoch = stream.epoch, stream.batch_in_epoch
        lengths = frame_lengths(run.core, batch)
        generator = generator_for(cfg.seed, run.rank, state.step, _MASK_STREAM)
        mask = compute_span_mask(
            lengths,
            num_frames(run.core, batch),
            cfg.mask_prob,
            cfg.mask_length,
            cfg.min_masks,
            generator,
        )
        if not bool(mask.any()):
            # Every utterance is shorter than two frames: nothing to learn from this batch.
            state.skipped_batches += 1
            empty_in_a_row += 1
            if empty_in_a_row >= _MAX_CONSECUTIVE_EMPTY:
                raise ValueError(
                    f"{empty_in_a_row} TAPT batches in a row had no utterance of two or more "
                    "encoder frames (40 ms); check the audio lengths of the TAPT corpus"
                )
            continue
        empty_in_a_row = 0
        loss, grad_norm, stats, lr_now = _train_step(run, batch, lengths, mask, generator)
        window.add(loss, grad_norm, stats, batch)
        finished = state.step >= cfg.steps
        if state.step % cfg.log_every == 0 or finished:
            last_metrics = _log_metrics(run, window, lr_now)
            if on_metrics is not None:
                on_metrics(dict(last_metrics))
            window.reset()
        if on_checkpoint is not None and (state.step % cfg.checkpoint_every == 0 or finished):
            _flush_losses(state, window.pending_losses)
            on_checkpoint(state.step, state.state_dict(cfg))
    return last_metrics


def _train_step(
    run: _Run,
    batch: dict[str, Any],
    lengths: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """One optimizer step on ``batch``: (loss, gradient norm, loss stats, learning rate used)."""
    cfg, state = run.cfg, run.state
    with _rng_fork(run.device):
        # Dropout and Gumbel noise come from torch's global RNG: seeded from (seed, rank, step)
        # so that a resumed step draws what the uninterrupted one drew.
        torch.manual_seed(seedsequence_seed(cfg.seed, run.rank, state.step, _TORCH_STREAM))
        with run.autocast:
            loss, stats = _objective_loss(run, batch, lengths, mask, generator)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if state.head is not None and run.world > 1:
        # The head lives outside the DDP wrapper, so nothing else averages its gradients.
        _all_reduce_mean(state.head.parameters(), run.world)
    if cfg.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, float("inf"))
    lr_now = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return loss, grad_norm, stats, lr_now


def _objective_loss(
    run: _Run,
    batch: dict[str, Any],
    lengths: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss; contrastive negatives continue the mask's ``generator``."""
    cfg, state = run.cfg, run.state
    if run.objective == "wav2vec2":
        negatives = sample_negatives(mask, lengths, cfg.num_negatives, generator)
        return wav2vec2_pretraining_loss(
            state.model,
            batch,
            mask,
            negatives,
            gumbel_temperature(state.step, cfg),
            cfg.diversity_loss_weight,
        )
    assert state.head is not None and state.targets is not None
    frame_targets = state.targets(batch)
    return hubert_pretraining_loss(state.model, state.head, batch, mask, frame_targets)


def _log_metrics(run: _Run, window: _LogWindow, lr_now: float) -> dict[str, Any]:
    """The metrics of the window's steps (means; ``n_masked`` summed) and throughput."""
    state = run.state
    elapsed = time.perf_counter() - window.started
    _flush_losses(state, window.pending_losses)
    metrics = _window_metrics(window.steps, state.step)
    metrics.update(
        lr=lr_now,
        epoch=state.epoch,
        seconds_per_step=elapsed / len(window.steps),
        utterances_per_s=window.utterances / max(elapsed, 1e-9),
        samples_per_s=window.samples / max(elapsed, 1e-9),
        skipped_batches=state.skipped_batches,
    )
    if run.objective == "wav2vec2":
        metrics["gumbel_temperature"] = gumbel_temperature(state.step - 1, run.cfg)
    return metrics


def _flush_losses(state: TaptState, pending: list[torch.Tensor]) -> None:
    if pending:
        state.loss_history.extend(torch.stack([x.float() for x in pending]).tolist())
        pending.clear()


def _window_metrics(window: list[dict[str, torch.Tensor]], step: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {"step": step}
    for key in window[0]:
        values = torch.stack([w[key].float() for w in window])
        metrics[key] = float(values.sum() if key == "n_masked" else values.mean())
    return metrics


def _all_reduce_mean(parameters: Iterable[nn.Parameter], world: int) -> None:
    for param in parameters:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)


def save_tapt_result(
    model: nn.Module, out_dir: str | os.PathLike, *, sampling_rate: int = 16_000
) -> Path:
    """Write the pre-trained backbone as a Hugging Face directory (what fine-tuning loads).

    Staged and renamed into place: a failed write (disk full) is a ``RunStateError`` and leaves
    the previous directory, if any, as it was.
    """
    return save_backbone(
        unwrap(model), out_dir, sampling_rate=sampling_rate, what="the TAPT-adapted backbone"
    )
