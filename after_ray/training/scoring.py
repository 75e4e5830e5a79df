"""Scoring a batch of pool utterances for active-learning selection (torch only, no Ray).

``score_batch`` is what the Ray Data scoring actor calls on every batch. Per utterance it
returns, as numpy arrays:

* ``probs`` [B, C]: class probabilities in eval mode (deterministic);
* ``embedding`` [B, H]: the pooled encoder output (for k-center / clustering);
* ``penultimate`` [B, P]: the input of the final linear layer. BADGE's gradient embedding is
  ``(p - onehot(argmax p)) (outer) penultimate``; it is never materialised here ([B, C*P] would be
  C times larger), the selection code factorises it;
* ``mc_probs`` [B, T, C]: T Monte-Carlo-dropout samples: every ``nn.Dropout`` on, everything else
  in eval mode (no SpecAugment, no LayerDrop, attention dropout as in eval), seeded. AFTER's
  "MC samples" were DC-offset copies of the input that GroupNorm cancels; these are real MC
  dropout (Gal & Ghahramani), as BALD needs.

The CNN encoder has no dropout, so it runs once per batch and only the rest runs T times.
MC samples are reproducible for a given (seed, batch); the dropout masks of one utterance depend
on its position in the batch, so re-batching the pool changes the draws (not their distribution).

Long utterances may be scored in chunks (rows sharing an ``utt_id``); ``average_chunks`` folds
them back into one row per utterance once all chunks of an utterance have been gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from after_ray.models.classifier import SERClassifier
from after_ray.seeding import blake2b_seed
from after_ray.training.finetune import model_inputs

SCORE_KEYS = ("probs", "embedding", "penultimate", "mc_probs")


def _set_dropout_only_train(model: nn.Module) -> None:
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()


@torch.no_grad()
def score_batch(
    model: SERClassifier,
    batch: dict[str, Any],
    *,
    mc_samples: int,
    seed: int,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Probabilities, embeddings, penultimate features and MC-dropout samples for one batch.

    Returns ``utt_id`` (str array) plus the arrays described in the module docstring and
    ``lengths`` (valid samples, for chunk weighting) when the batch has them. ``mc_samples=0``
    gives ``mc_probs`` of shape [B, 0, C]. Leaves the model in eval mode.
    """
    if mc_samples < 0:
        raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = model_inputs(batch, device)
    if "cnn_features" in inputs:
        features, frame_mask = inputs["cnn_features"], inputs["frame_mask"]
    else:
        features, frame_mask = model.encode_cnn(
            inputs["input_values"], inputs.get("attention_mask")
        )
    output = model.forward_features(cnn_features=features, frame_mask=frame_mask)
    probs = torch.softmax(output.logits.float(), dim=-1)

    samples = []
    if mc_samples:
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        # fork_rng: the seeded draws leave the caller's random state untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(blake2b_seed(seed, "mc-dropout"))
            _set_dropout_only_train(model)
            try:
                for _ in range(mc_samples):
                    logits = model.forward_features(cnn_features=features, frame_mask=frame_mask)
                    samples.append(torch.softmax(logits.logits.float(), dim=-1))
            finally:
                model.eval()
    mc_probs = (
        torch.stack(samples, dim=1)
        if samples
        else probs.new_zeros(probs.shape[0], 0, probs.shape[1])
    )
    if was_training:
        model.train()
    result = {
        "utt_id": np.asarray([str(u) for u in batch["utt_id"]], dtype=object),
        "probs": probs.cpu().numpy().astype(np.float32),
        "embedding": output.pooled.float().cpu().numpy(),
        "penultimate": output.penultimate.float().cpu().numpy(),
        "mc_probs": mc_probs.cpu().numpy().astype(np.float32),
    }
    if batch.get("lengths") is not None:
        result["lengths"] = np.asarray(batch["lengths"], dtype=np.int64)
    return result


def average_chunks(
    scores: dict[str, np.ndarray], *, weights: Sequence[float] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """One row per ``utt_id`` from chunk-level rows, in order of first appearance.

    Every array in ``SCORE_KEYS`` present in ``scores`` is averaged over an utterance's chunks,
    weighted by ``weights`` (default: ``scores["lengths"]`` when present, so a short tail chunk
    counts less; else equal weights). MC samples are averaged per sample index. Pass all chunks
    of an utterance in one call (gather them first: chunks can land in different batches).
    """
    utt_ids = np.asarray(scores["utt_id"]).astype(str)
    unique, first_index, inverse = np.unique(utt_ids, return_index=True, return_inverse=True)
    if len(unique) == len(utt_ids):
        # One chunk per utterance (the usual case): nothing to average, and no float64 copies
        # of a pool's matrices.
        out = {"utt_id": np.asarray(scores["utt_id"], dtype=object)}
        for key in SCORE_KEYS:
            if key in scores:
                out[key] = np.asarray(scores[key], dtype=np.float32)
        if "lengths" in scores:
            out["lengths"] = np.asarray(scores["lengths"], dtype=np.int64)
        return out
    order = np.argsort(first_index)  # unique is sorted; keep first-appearance order instead
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse]
    if weights is None:
        weights = scores.get("lengths")
    w = np.ones(len(utt_ids)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(utt_ids),) or np.any(w < 0):
        raise ValueError("weights must be one non-negative number per chunk")
    totals = np.bincount(group, weights=w, minlength=len(unique))
    totals = np.where(totals > 0, totals, 1.0)
    out: dict[str, np.ndarray] = {"utt_id": unique[order].astype(object)}
    for key in SCORE_KEYS:
        if key not in scores:
            continue
        values = np.asarray(scores[key], dtype=np.float64)
        summed = np.zeros((len(unique),) + values.shape[1:])
        np.add.at(summed, group, values * w.reshape((-1,) + (1,) * (values.ndim - 1)))
        out[key] = (summed / totals.reshape((-1,) + (1,) * (values.ndim - 1))).astype(np.float32)
    if "lengths" in scores:
        out["lengths"] = np.bincount(
            group, weights=np.asarray(scores["lengths"]), minlength=len(unique)
        ).astype(np.int64)
    return out
