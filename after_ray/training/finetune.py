"""Per-round fine-tuning of the SER classifier on the labeled set (torch only, no Ray).

``finetune`` trains with class-weighted (soft) cross-entropy, evaluates on the validation set
every epoch, keeps the weights of the epoch with the best validation UA and stops early after
``early_stopping_patience`` epochs without improvement. It fixes AFTER's fine-tuning bugs: the
batch provider shuffles every epoch and keeps partial batches, and the model returned is the
best-validation one, not the last epoch's.

Batches follow the audio batch contract (``input_values``, ``attention_mask``, ``utt_id``,
``label_index``, ``soft_target``); a batch may instead carry ``cnn_features`` + ``frame_mask``
(cached CNN encoder output, see ``build_cnn_cache`` / ``CachedFeatureBatches``).

Feature cache: with a frozen CNN encoder its output depends on the utterance only, so it is
computed once per utterance (``build_cnn_cache``) and the rest of the model trains on it. We cache
*full* utterances and take the per-epoch random training crop in frames. Trade-off: a frame crop
is what the CNN gives on the corresponding audio crop except that (a) the waveform was
normalised over the whole utterance, not the crop, and (b) a GroupNorm CNN (wav2vec2-base)
normalises its first layer over the whole utterance; a LayerNorm CNN (large models) is otherwise
exact. Both differences are per-utterance gain/offset statistics and matter little; validation and
scoring always see full utterances, where the cache is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from after_ray.config.finetune import FinetuneConfig
from after_ray.errors import ConfigError
from after_ray.metrics import classification_report
from after_ray.models.classifier import SERClassifier
from after_ray.seeding import blake2b_seed
from after_ray.store.atomic import to_jsonable
from after_ray.training.ddp import rank_and_world
from after_ray.training.precision import autocast_for, grad_scaler_for, resolve_precision

Batch = dict[str, Any]
TrainBatches = Callable[[int], Iterable[Batch]]
log = logging.getLogger(__name__)
ValBatches = Callable[[], Iterable[Batch]]


# --------------------------------------------------------------------------- model construction
# ------------------------------------------------------------------------------- loss / weights
def class_counts_from_labels(label_index: Iterable[int], n_classes: int) -> np.ndarray:
    """Count of labeled items per class (``-1`` = unlabeled, ignored)."""
    labels = np.asarray(list(label_index), dtype=np.int64)
    labels = labels[labels >= 0]
    return np.bincount(labels, minlength=n_classes)[:n_classes].astype(np.float64)


def class_weights_from_counts(counts: Sequence[float]) -> np.ndarray:
    """Inverse-frequency weights normalised to sum 1 (AFTER: ``w_c = (N/n_c) / sum_k N/n_k``).

    A class without any labeled item gets the weight of the rarest class that has one, so that
    its soft-label vote mass still counts; with no labeled item at all the weights are uniform.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return np.full(counts.shape, 1.0 / len(counts))
    inverse = np.zeros_like(counts)
    inverse[present] = counts[present].sum() / counts[present]
    inverse[~present] = inverse[present].max()
    return inverse / inverse.sum()


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against target distributions ``[B, C]``, optionally class-weighted.

    ``sum_i sum_c w_c q_ic (-log p_ic) / sum_i sum_c w_c q_ic``: with one-hot targets this is
    exactly ``F.cross_entropy(logits, labels, weight=w)`` (whose mean divides by the summed weights
    of the targets), and without weights the plain batch mean.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = targets.to(log_probs.dtype)
    if class_weights is None:
        return -(targets * log_probs).sum(dim=-1).mean()
    weighted = targets * class_weights.to(log_probs.device, log_probs.dtype)[None, :]
    return -(weighted * log_probs).sum() / weighted.sum()


def _utt_ids(batch: Batch) -> list[str]:
    return [str(u) for u in batch["utt_id"]]


def batch_targets(
    batch: Batch, n_classes: int, aggregation: str, *, seed: int = 0, epoch: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets ``[B, C]`` float, labeled-row mask ``[B]``) for one batch.

    ``majority``: one-hot of ``label_index`` (or of the vote distribution's argmax, lowest class
    on ties, when only ``soft_target`` is present). ``distribution``: ``soft_target`` renormalised
    (one-hot of ``label_index`` for items without votes). ``sample``: one class drawn from ``soft_target``
    per utterance, seeded by (seed, epoch, utt_id) so it does not depend on the batch order.
    """
    soft = batch.get("soft_target")
    hard = batch.get("label_index")
    if soft is None and hard is None:
        raise ValueError("a training batch needs label_index or soft_target")
    soft_t = None
    if soft is not None:
        soft_t = torch.as_tensor(np.asarray(soft), dtype=torch.float32)
        if soft_t.ndim != 2 or soft_t.shape[1] != n_classes:
            raise ValueError(f"soft_target must be [batch, {n_classes}], got {tuple(soft_t.shape)}")
        soft_t = torch.nan_to_num(soft_t, nan=0.0)
    if hard is not None:
        hard_t = torch.as_tensor(np.asarray(hard), dtype=torch.long)
    else:
        assert soft_t is not None
        hard_t = torch.where(soft_t.sum(dim=1) > 0, soft_t.argmax(dim=1), -1)
    one_hot = F.one_hot(hard_t.clamp(min=0), n_classes).float() * (hard_t >= 0)[:, None]
    if aggregation == "majority" or soft_t is None:
        return one_hot, hard_t >= 0
    vote_mass = soft_t.sum(dim=1, keepdim=True)
    has_votes = vote_mass > 0
    labeled = (hard_t >= 0) | has_votes[:, 0]
    # Votes for classes outside the task were dropped upstream: renormalise what is left.
    distribution = torch.where(has_votes, soft_t / vote_mass.clamp(min=1e-12), one_hot)
    if aggregation == "distribution":
        return distribution, labeled
    if aggregation != "sample":
        raise ValueError(f"unknown label_aggregation {aggregation!r}")
    sampled = torch.zeros_like(distribution)
    for row, utt_id in enumerate(_utt_ids(batch)):
        if not bool(labeled[row]):
            continue
        probs = distribution[row].double().numpy()
        rng = np.random.default_rng(blake2b_seed(seed, epoch, utt_id))
        sampled[row, int(rng.choice(n_classes, p=probs / probs.sum()))] = 1.0
    return sampled, labeled


# ----------------------------------------------------------------------------- batch plumbing
def model_inputs(batch: Batch, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``SERClassifier.forward`` for a batch (audio or cached)."""
    if "cnn_features" in batch:
        return {
            "cnn_features": torch.as_tensor(batch["cnn_features"]).to(device, torch.float32),
            "frame_mask": torch.as_tensor(batch["frame_mask"]).to(device, torch.bool),
        }
    inputs = {"input_values": torch.as_tensor(batch["input_values"]).to(device, torch.float32)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = torch.as_tensor(batch["attention_mask"]).to(device)
    return inputs


@torch.no_grad()
def build_cnn_cache(
    model: SERClassifier,
    batches: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """CNN encoder output per utterance, ``utt_id -> [frames, channels]`` on the CPU.

    Give it full (uncropped) utterances; the output on valid frames does not depend on padding
    (see ``SERClassifier.encode_cnn``), so any batching gives the same cache.
    """
    cache: dict[str, torch.Tensor] = {}
    model.to(device)
    for batch in batches:
        inputs = model_inputs(batch, device)
        features, frame_mask = model.encode_cnn(
            inputs["input_values"], inputs.get("attention_mask")
        )
        counts = frame_mask.sum(dim=1).tolist()
        for row, utt_id in enumerate(_utt_ids(batch)):
            cache[utt_id] = features[row, : counts[row]].to("cpu", dtype).clone()
    return cache


class CachedFeatureBatches:
    """Batch provider over cached CNN features: ``provider(epoch)`` yields padded batches.

    Order is shuffled per epoch (seeded by ``seed`` and the epoch) when ``shuffle``; with
    ``crop_frames`` each utterance longer than that is cropped at a random frame, seeded by
    (seed, epoch, utt_id). Targets come from ``label_index`` / ``soft_target`` keyed by utt_id
    (the labeled set), not from the cache. The last partial batch is kept.
    """

    def __init__(
        self,
        cache: Mapping[str, torch.Tensor],
        utt_ids: Sequence[str],
        *,
        label_index: Mapping[str, int] | None = None,
        soft_target: Mapping[str, Sequence[float]] | None = None,
        batch_size: int = 16,
        crop_frames: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        missing = [u for u in utt_ids if u not in cache]
        if missing:
            raise KeyError(
                f"{len(missing)} utterances are not in the feature cache, e.g. {missing[:3]}"
            )
        self.cache = cache
        self.utt_ids = [str(u) for u in utt_ids]
        self.label_index = label_index
        self.soft_target = soft_target
        self.batch_size = batch_size
        self.crop_frames = crop_frames
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(len(self.utt_ids) / self.batch_size)

    def __call__(self, epoch: int = 0) -> Iterator[Batch]:
        order = list(self.utt_ids)
        if self.shuffle:
            rng = np.random.default_rng(blake2b_seed(self.seed, epoch, "order"))
            order = [order[i] for i in rng.permutation(len(order))]
        for start in range(0, len(order), self.batch_size):
            yield self._batch(order[start : start + self.batch_size], epoch)

    def _crop(self, utt_id: str, features: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.crop_frames is None or features.shape[0] <= self.crop_frames:
            return features
        rng = np.random.default_rng(blake2b_seed(self.seed, epoch, utt_id, "crop"))
        offset = int(rng.integers(0, features.shape[0] - self.crop_frames + 1))
        return features[offset : offset + self.crop_frames]

    def _batch(self, utt_ids: list[str], epoch: int) -> Batch:
        items = [self._crop(u, self.cache[u], epoch) for u in utt_ids]
        frames = max(item.shape[0] for item in items)
        features = torch.zeros(len(items), frames, items[0].shape[1], dtype=torch.float32)
        frame_mask = torch.zeros(len(items), frames, dtype=torch.bool)
        for row, item in enumerate(items):
            features[row, : item.shape[0]] = item.float()
            frame_mask[row, : item.shape[0]] = True
        batch: Batch = {"cnn_features": features, "frame_mask": frame_mask, "utt_id": utt_ids}
        if self.label_index is not None:
            batch["label_index"] = torch.tensor(
                [int(self.label_index.get(u, -1)) for u in utt_ids], dtype=torch.long
            )
        if self.soft_target is not None:
            batch["soft_target"] = torch.tensor(
                np.stack([np.asarray(self.soft_target[u], dtype=np.float32) for u in utt_ids])
            )
        return batch


def crop_frames_for(model: SERClassifier, max_duration_s: float, sampling_rate: int = 16000) -> int:
    """Frames of CNN output for ``max_duration_s`` seconds of audio."""
    samples = torch.tensor([int(round(max_duration_s * sampling_rate))])
    return int(model.frame_lengths(samples)[0])


def _cache_with_targets(
    batches: Iterable[Batch],
    cache: dict[str, torch.Tensor],
    model: SERClassifier,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[list[str], dict[str, int], dict[str, np.ndarray]]:
    """Fill ``cache`` from ``batches``; return their utt_ids and targets keyed by utt_id."""
    label_index: dict[str, int] = {}
    soft_target: dict[str, np.ndarray] = {}
    order: list[str] = []
    for batch in batches:
        cache.update(build_cnn_cache(model, [batch], device=device, dtype=dtype))
        ids = _utt_ids(batch)
        order.extend(ids)
        if batch.get("label_index") is not None:
            label_index.update(zip(ids, np.asarray(batch["label_index"]).tolist(), strict=True))
        if batch.get("soft_target") is not None:
            soft_target.update(
                zip(ids, np.asarray(batch["soft_target"], dtype=np.float32), strict=True)
            )
    return order, label_index, soft_target


def make_cached_providers(
    cfg: FinetuneConfig,
    model: SERClassifier,
    train_full_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    sampling_rate: int = 16000,
) -> tuple[CachedFeatureBatches, Callable[[], Iterator[Batch]], dict[str, float]]:
    """Train and validation batch providers for ``finetune`` that serve cached CNN features.

    ``train_full_batches`` must hold the labeled utterances *uncropped* (one pass); training
    batches of ``cfg.batch_size`` are then shuffled and cropped to ``cfg.max_duration_s`` in frames
    per epoch. Validation keeps its batching and full length (exact). Targets are taken from the
    batches. Use it when ``cfg.cache_features`` and ``model.feature_encoder_frozen``.
    """
    if not model.feature_encoder_frozen:
        raise ConfigError(
            "the CNN feature cache needs a frozen CNN encoder (finetune.freeze_feature_encoder); "
            "an encoder that trains changes its output every step"
        )
    dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    tick = time.perf_counter()
    train_cache: dict[str, torch.Tensor] = {}
    train_ids, train_labels, train_soft = _cache_with_targets(
        train_full_batches, train_cache, model, device, dtype
    )
    val_cache: dict[str, torch.Tensor] = {}
    val_batches = list(val_batches)
    _, val_labels, val_soft = _cache_with_targets(val_batches, val_cache, model, device, dtype)
    train = CachedFeatureBatches(
        train_cache,
        train_ids,
        label_index=train_labels or None,
        soft_target=train_soft or None,
        batch_size=cfg.batch_size,
        crop_frames=crop_frames_for(model, cfg.max_duration_s, sampling_rate),
        shuffle=True,
        seed=cfg.seed,
    )
    val_groups = [_utt_ids(b) for b in val_batches]

    def val_provider() -> Iterator[Batch]:
        for ids in val_groups:
            provider = CachedFeatureBatches(
                val_cache,
                ids,
                label_index=val_labels or None,
                soft_target=val_soft or None,
                batch_size=len(ids),
                shuffle=False,
            )
            yield from provider(0)

    bytes_held = sum(
        v.numel() * v.element_size() for c in (train_cache, val_cache) for v in c.values()
    )
    stats = {
        "cache_build_s": time.perf_counter() - tick,
        "cache_mb": bytes_held / 2**20,
        "train_utterances": float(len(train_ids)),
        "val_utterances": float(sum(len(ids) for ids in val_groups)),
    }
    return train, val_provider, stats


# ------------------------------------------------------------------------------- train / eval
@dataclass
class EpochRecord:
    """One epoch of fine-tuning: training loss, validation metrics and wall time."""

    epoch: int
    train_loss: float
    val_loss: float
    val_ua: float
    val_wa: float
    val_macro_f1: float
    train_s: float
    val_s: float
    is_best: bool = False


@dataclass
class FinetuneResult:
    """What ``finetune`` returns; ``model`` already holds ``best_state_dict`` on return."""

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_ua: float
    best_val_report: dict[str, Any]
    history: list[EpochRecord]
    class_weights: list[float] | None
    stopped_early: bool
    timings: dict[str, float] = field(default_factory=dict)
    # batch_size x grad_accumulation x workers, and the precision "auto" resolved to.
    effective_batch: int = 0
    precision: str = "fp32"


def train_one_epoch(
    model: SERClassifier,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    n_classes: int,
    class_weights: torch.Tensor | None,
    cfg: FinetuneConfig,
    epoch: int,
    device: torch.device | str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over ``batches``; returns the item-weighted mean training loss.

    The optimizer steps every ``cfg.grad_accumulation`` batches on the summed gradients of the
    group's losses, each scaled 1/N (the epoch's last group steps too, its gradient rescaled to
    the mean of the batches it has), clipped as one gradient. ``cfg.precision`` autocasts the
    forward pass and the loss (``after_ray.training.precision``); fp16 scales the loss with
    ``scaler`` (one is made when it is None), which ``finetune`` keeps across epochs.

    Under DistributedDataParallel (torch.distributed with more than one rank) every optimizer
    step is a collective, so all ranks must take the same number of them; see
    ``_steps_on_every_rank``. Micro-batches that do not step run under ``model.no_sync()`` (the
    all-reduce comes with the group's last backward pass). The loss returned is then the mean
    over every rank's items, the same number on every rank.
    """
    model.train()
    _, world = rank_and_world()
    resolved = resolve_precision(cfg.precision, device)
    if scaler is None:
        scaler = grad_scaler_for(resolved, device)
    accumulation = cfg.grad_accumulation
    trainable = [p for p in model.parameters() if p.requires_grad]
    total, items, pending = 0.0, 0, 0
    for batch, last in _with_last(_steps_on_every_rank(batches, world, device)):
        targets, labeled = batch_targets(
            batch, n_classes, cfg.label_aggregation, seed=cfg.seed, epoch=epoch
        )
        if bool(labeled.any()) or world > 1:
            steps_now = last or pending + 1 == accumulation
            syncs = steps_now or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if syncs else model.no_sync():
                loss, count = _micro_batch(
                    model,
                    batch,
                    targets,
                    labeled,
                    class_weights,
                    device,
                    resolved,
                    optimizer if pending == 0 else None,
                    scaler,
                    accumulation,
                )
            pending += 1
            total += loss * count
            items += count
        if pending and (pending == accumulation or last):
            _optimizer_step(optimizer, trainable, cfg, scaler, accumulation / pending)
            pending = 0
    if world > 1:
        total, items = _sum_over_ranks(total, items, device)
    if items == 0 and world > 1:
        raise ConfigError(
            f"fine-tuning got no labeled utterance in an epoch on any of its {world} workers: "
            "each trains on as many batches as the worker with the fewest, so a labeled set "
            "smaller than ray.num_workers leaves one with none (use fewer workers)"
        )
    if items == 0:
        raise ConfigError(
            "fine-tuning got no labeled utterance in an epoch: the labeled set is empty "
            "(check al.budget.initial and the batch provider)"
        )
    return total / items


def _micro_batch(
    model: SERClassifier,
    batch: Batch,
    targets: torch.Tensor,
    labeled: torch.Tensor,
    class_weights: torch.Tensor | None,
    device: torch.device | str,
    resolved: str,
    zero_grad_of: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    accumulation: int,
) -> tuple[float, int]:
    """Forward (autocast), loss and backward of one batch: (its loss, its labeled items).
    ``zero_grad_of`` (the optimizer, on a group's first batch) has its gradients cleared first."""
    with autocast_for(resolved, device):  # type: ignore[arg-type]
        logits = model(**model_inputs(batch, device))
        labeled = labeled.to(logits.device)
        if bool(labeled.any()):
            loss = soft_cross_entropy(
                logits[labeled], targets.to(logits.device)[labeled], class_weights
            )
        else:
            # Nothing labeled in this rank's batch while the others step: a zero loss that
            # reaches every parameter, so this rank joins the gradient all-reduce with zeros.
            loss = logits.float().sum() * 0.0
    if zero_grad_of is not None:
        zero_grad_of.zero_grad(set_to_none=True)
    scaled = loss if accumulation == 1 else loss / accumulation
    (scaled if scaler is None else scaler.scale(scaled)).backward()
    return float(loss.detach()), int(labeled.sum())


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    cfg: FinetuneConfig,
    scaler: torch.amp.GradScaler | None,
    rescale: float,
) -> None:
    """Step on the accumulated gradient: unscale (fp16), make it the group's mean when the
    group was short (``rescale`` = N / its batches), clip, step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if rescale != 1.0:
        for param in trainable:
            if param.grad is not None:
                param.grad.mul_(rescale)
    if cfg.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` for each item: one item of look-ahead."""
    iterator = iter(items)
    sentinel = object()
    current = next(iterator, sentinel)
    while current is not sentinel:
        following = next(iterator, sentinel)
        yield current, following is sentinel
        current = following


def _steps_on_every_rank(
    batches: Iterable[Batch], world: int, device: torch.device | str
) -> Iterator[Batch]:
    """``batches`` while every rank still has one: ranks with uneven shards step together.

    DDP all-reduces the gradients in every backward pass, so a rank with one batch more than
    the others would wait in that all-reduce for ranks that have moved on (to validation and
    Ray Train's report barrier): a deadlock that only the process group's timeout (30 min)
    ends. Before each step the ranks agree (an all-reduce MIN of "I have a batch") and all stop
    when the first runs out: the longer shards' last batches are left out of that epoch, as
    ``DistributedSampler(drop_last=True)`` does; the shuffle changes per epoch, so other items
    are left out each epoch. (torch's ``Join`` would train those batches instead, but the ranks that
    joined early skip their optimizer steps, so their AdamW moments part from the others'.)
    One rank (``world == 1``) iterates ``batches`` as it is.
    """
    if world == 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        have = torch.tensor([0 if batch is None else 1], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        if not int(have.item()):
            return
        assert batch is not None
        yield batch


def _sum_over_ranks(total: float, items: int, device: torch.device | str) -> tuple[float, int]:
    """(loss sum, item count) summed over every rank."""
    both = torch.tensor([total, float(items)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return float(both[0]), int(round(float(both[1])))


@torch.no_grad()
def evaluate(
    model: SERClassifier,
    batches: Iterable[Batch],
    class_names: Sequence[str],
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """``metrics.classification_report`` on the labeled items of ``batches`` plus ``loss`` (mean
    unweighted cross-entropy against the hard labels), in eval mode."""
    model.eval()
    n_classes = len(class_names)
    truths: list[np.ndarray] = []
    predictions: list[np.ndarray] = []
    loss_sum = 0.0
    for batch in batches:
        targets, labeled = batch_targets(batch, n_classes, "majority")
        if not bool(labeled.any()):
            continue
        logits = model(**model_inputs(batch, device)).float().cpu()
        logits, labels = logits[labeled], targets[labeled].argmax(dim=1)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        truths.append(labels.numpy())
        predictions.append(logits.argmax(dim=1).numpy())
    if not truths:
        raise ConfigError(
            "the validation set has no labeled utterance, so no model can be selected; "
            "give the corpus a validation split (corpus.split.val_fraction > 0)"
        )
    y_true, y_pred = np.concatenate(truths), np.concatenate(predictions)
    report = classification_report(y_true, y_pred, class_names)
    report["loss"] = loss_sum / len(y_true)
    return report


def _count_classes(train_batches: TrainBatches, n_classes: int) -> np.ndarray:
    labels: list[int] = []
    for batch in train_batches(0):
        targets, labeled = batch_targets(batch, n_classes, "majority")
        labels.extend(targets[labeled].argmax(dim=1).tolist())
    return class_counts_from_labels(labels, n_classes)


def finetune(
    cfg: FinetuneConfig,
    model: SERClassifier,
    train_batches: TrainBatches,
    val_batches: ValBatches,
    class_names: Sequence[str],
    *,
    on_epoch_end: Callable[[EpochRecord, SERClassifier], bool | None] | None = None,
    device: torch.device | str = "cpu",
    class_counts: Sequence[float] | None = None,
    start_state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int, Callable[[], dict[str, Any]]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on the labeled set and keep the best-validation-UA weights.

    ``train_batches(epoch)`` yields the epoch's (shuffled, cropped) labeled batches;
    ``val_batches()`` the validation batches. ``class_counts`` are the labeled set's per-class
    counts for the loss weights; when None they are counted from ``train_batches(0)`` (one extra
    pass over the provider). ``on_epoch_end(record, model)`` runs after each epoch (report metrics,
    checkpoint); returning True stops training. The same seed and inputs give the same result.
    ``model`` may be wrapped in DistributedDataParallel (``best_state_dict`` has no ``module.``
    prefix); each worker selects on what its own ``val_batches`` gives it, so give every worker
    the whole validation set to keep the selected epoch identical across workers. Workers whose
    ``train_batches`` differ in length take the same number of steps (``train_one_epoch``).

    Resuming: ``on_checkpoint(epoch, get_state)`` runs after each epoch that does not end the
    run; ``get_state()`` builds the state to save (weights, optimizer, best weights so far,
    history, early-stopping counter). ``start_state`` (such a state, loaded back) continues with
    the next epoch. Epoch ``e`` draws its crops, dropout and SpecAugment from (seed, e) only, so a
    resumed run ends with exactly the weights of an uninterrupted one.
    """
    # A DistributedDataParallel wrapper runs the forward passes; weights live in its .module.
    core: SERClassifier = getattr(model, "module", model)
    if len(class_names) != core.n_classes:
        raise ConfigError(
            f"{len(class_names)} class names for a classifier with {core.n_classes} outputs"
        )
    started = time.perf_counter()
    model.to(device)
    weights_np, weights = _loss_weights(cfg, train_batches, core.n_classes, class_counts, device)

    resolved = resolve_precision(cfg.precision, device)  # fp16 on the CPU fails here, at start
    scaler = grad_scaler_for(resolved, device)
    _, world = rank_and_world()
    effective_batch = cfg.batch_size * cfg.grad_accumulation * world
    log.info(
        "fine-tuning: effective batch %d = batch_size %d x grad_accumulation %d x %d worker(s); "
        "precision %s (%s on %s); lr %g head, %g backbone",
        effective_batch,
        cfg.batch_size,
        cfg.grad_accumulation,
        world,
        resolved,
        cfg.precision,
        torch.device(device).type,
        cfg.lr,
        cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr,
    )
    optimizer = build_optimizer(cfg, core)
    selection = _Selection()
    stopped_early = False
    first_epoch = 0
    if start_state is not None:
        core.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        selection = _Selection.from_checkpoint(start_state)
        first_epoch = int(start_state["next_epoch"])
    for epoch in range(first_epoch, cfg.epochs):
        train_loss, report, train_s, val_s = _train_and_validate(
            model,
            optimizer,
            train_batches,
            val_batches,
            class_names,
            class_weights=weights,
            cfg=cfg,
            epoch=epoch,
            device=device,
            scaler=scaler,
        )
        record = selection.add(epoch, train_loss, report, train_s, val_s, core)
        if on_epoch_end is not None and on_epoch_end(record, model):
            stopped_early = epoch < cfg.epochs - 1
            break
        if cfg.early_stopping_patience and selection.since_best >= cfg.early_stopping_patience:
            stopped_early = epoch < cfg.epochs - 1
            break
        due = cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0
        if on_checkpoint is not None and due and epoch < cfg.epochs - 1:
            on_checkpoint(epoch, _state_builder(epoch, core, optimizer, selection))
    assert selection.best_state is not None  # at least one epoch ran and UA > -inf
    core.load_state_dict(selection.best_state)
    return FinetuneResult(
        best_state_dict=selection.best_state,
        best_epoch=selection.best_epoch,
        best_val_ua=selection.best_ua,
        best_val_report=selection.best_report,
        history=selection.history,
        class_weights=None if weights_np is None else [float(w) for w in weights_np],
        stopped_early=stopped_early,
        timings={
            "total_s": time.perf_counter() - started,
            "train_s": sum(r.train_s for r in selection.history),
            "val_s": sum(r.val_s for r in selection.history),
            "epochs_run": float(len(selection.history)),
        },
        effective_batch=effective_batch,
        precision=resolved,
    )


def build_optimizer(cfg: FinetuneConfig, model: SERClassifier) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: one group at ``cfg.lr``, or, with
    ``cfg.backbone_lr``, the backbone's (``model.backbone``) at backbone_lr and the rest (the
    head) at lr. Every trainable parameter is in exactly one group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.backbone_lr is None:
        return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    in_backbone = {id(p) for p in model.backbone.parameters()}
    backbone = [p for p in trainable if id(p) in in_backbone]
    head = [p for p in trainable if id(p) not in in_backbone]
    groups = [{"params": head, "lr": cfg.lr}, {"params": backbone, "lr": cfg.backbone_lr}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay
    )


def _loss_weights(
    cfg: FinetuneConfig,
    train_batches: TrainBatches,
    n_classes: int,
    class_counts: Sequence[float] | None,
    device: torch.device | str,
) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """The loss's class weights, as numpy (for the result) and as a tensor on ``device``; both
    None unless ``cfg.class_weighted``. Without ``class_counts`` they are counted from
    ``train_batches(0)``."""
    if not cfg.class_weighted:
        return None, None
    counts = (
        np.asarray(class_counts, dtype=np.float64)
        if class_counts is not None
        else _count_classes(train_batches, n_classes)
    )
    if counts.shape != (n_classes,):
        raise ConfigError(f"class_counts must have {n_classes} entries, got {counts.shape}")
    weights_np = class_weights_from_counts(counts)
    return weights_np, torch.tensor(weights_np, dtype=torch.float32, device=device)


def _train_and_validate(
    model: SERClassifier,
    optimizer: torch.optim.Optimizer,
    train_batches: TrainBatches,
    val_batches: ValBatches,
    class_names: Sequence[str],
    *,
    class_weights: torch.Tensor | None,
    cfg: FinetuneConfig,
    epoch: int,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, dict[str, Any], float, float]:
    """One epoch: (training loss, validation report, training seconds, validation seconds)."""
    # Reseed per epoch: dropout and SpecAugment draws then depend on (seed, epoch) only.
    torch.manual_seed(blake2b_seed(cfg.seed, epoch, "torch"))
    tick = time.perf_counter()
    train_loss = train_one_epoch(
        model,
        optimizer,
        train_batches(epoch),
        n_classes=len(class_names),
        class_weights=class_weights,
        cfg=cfg,
        epoch=epoch,
        device=device,
        scaler=scaler,
    )
    train_s = time.perf_counter() - tick
    tick = time.perf_counter()
    report = evaluate(model, val_batches(), class_names, device=device)
    return train_loss, report, train_s, time.perf_counter() - tick


@dataclass
class _Selection:
    """Model selection so far: every epoch's record, the best-validation-UA epoch (its weights
    on the CPU, its report) and the early-stopping counter. Checkpoints carry all of it, so a
    resumed run selects and stops exactly as an uninterrupted one."""

    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_report: dict[str, Any] = field(default_factory=dict)
    best_epoch: int = -1
    best_ua: float = -math.inf
    since_best: int = 0

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> _Selection:
        return cls(
            history=[EpochRecord(**record) for record in state["history"]],
            best_state=state["best_model"],
            best_report=json.loads(state["best_report_json"]),
            best_epoch=int(state["best_epoch"]),
            best_ua=float(state["best_ua"]),
            since_best=int(state["since_best"]),
        )

    def add(
        self,
        epoch: int,
        train_loss: float,
        report: dict[str, Any],
        train_s: float,
        val_s: float,
        core: SERClassifier,
    ) -> EpochRecord:
        """Record an epoch; when its UA is the best yet, keep a CPU copy of ``core``'s weights."""
        improved = report["ua"] > self.best_ua  # ties keep the earlier epoch
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=report["loss"],
            val_ua=report["ua"],
            val_wa=report["wa"],
            val_macro_f1=report["macro_f1"],
            train_s=train_s,
            val_s=val_s,
            is_best=improved,
        )
        self.history.append(record)
        if improved:
            self.best_ua, self.best_epoch, self.since_best = report["ua"], epoch, 0
            self.best_report = report
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in core.state_dict().items()
            }
        else:
            self.since_best += 1
        return record


def _state_builder(
    epoch: int, core: SERClassifier, optimizer: torch.optim.Optimizer, selection: _Selection
) -> Callable[[], dict[str, Any]]:
    """``get_state`` for ``on_checkpoint``: the state to resume after ``epoch``.

    Built on demand (only the rank that saves pays for the copy); on_checkpoint calls it before
    returning, so what it reads of ``selection`` is this epoch's.
    """

    def get_state() -> dict[str, Any]:
        return {
            "next_epoch": epoch + 1,
            "model": {k: v.detach().to("cpu") for k, v in core.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "history": [dataclasses.asdict(r) for r in selection.history],
            "best_model": selection.best_state,
            # JSON: the report holds numpy scalars, which weights_only loading refuses.
            "best_report_json": json.dumps(to_jsonable(selection.best_report)),
            "best_epoch": selection.best_epoch,
            "best_ua": selection.best_ua,
            "since_best": selection.since_best,
        }

    return get_state
