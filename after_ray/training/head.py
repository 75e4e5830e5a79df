"""Training and applying the head of a frozen-backbone classifier (``finetune.mode: head``).

The backbone (the TAPT model) is not trained; one pass over the corpus caches every utterance's
pooled features (``SERClassifier`` with its default standardisation gives the raw statistics).
A round then only fits the head on the cached features of the labeled items:

* the pooled features are standardised with the mean and std of the whole unlabeled *pool*
  (no labels involved; fixed for the run, so rounds and arms share one coordinate system);
* the head is the classifier's own linear layer, trained as a class-weighted (inverse
  frequency of the current labels, as in full fine-tuning) soft-target logistic regression with
  an L2 penalty, full batch, by L-BFGS: deterministic, and ~0.1 s for thousands of items;
* each L2 strength of ``finetune.head_l2_grid`` is fitted from the same seeded start and the
  one with the best validation UA is kept (ties: the first), the counterpart of keeping the
  best epoch in full fine-tuning.

The trained weights go back into the ``SERClassifier``, which is saved like any round model, so
scoring its checkpoint from audio gives what ``head_outputs`` gives from the cache (a test
checks it). Torch only, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from after_ray.metrics import classification_report
from after_ray.models.classifier import SERClassifier
from after_ray.seeding import blake2b_seed
from after_ray.training.finetune import class_weights_from_counts

# L-BFGS stops after this many iterations per L2 value (converged long before on these sizes).
LBFGS_MAX_ITER = 200


@dataclass
class HeadFit:
    """The kept L2 strength, its validation report, and the validation UA of every strength."""

    l2: float
    val_report: dict[str, Any]
    val_ua_by_l2: dict[float, float]
    train_loss: float


def pool_standardisation(pool_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` of the pool's pooled features; constant columns get scale 1."""
    features = np.asarray(pool_features, dtype=np.float64)
    shift = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    return shift.astype(np.float32), scale.astype(np.float32)


def _reset_head(model: SERClassifier, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
        if model.projector is not None:
            model.projector.reset_parameters()


def _head_parameters(model: SERClassifier) -> list[torch.nn.Parameter]:
    params = list(model.classifier.parameters())
    if model.projector is not None:
        params += list(model.projector.parameters())
    return params


def _fit_one(
    model: SERClassifier,
    standardised: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor,
    l2: float,
) -> float:
    """One L-BFGS fit of the head's linear layers on already standardised inputs."""
    params = _head_parameters(model)
    optimizer = torch.optim.LBFGS(
        params, max_iter=LBFGS_MAX_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )
    # Per-item weight = the weight of its (soft) target classes; the loss is a weighted mean.
    item_weights = targets @ class_weights

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        hidden = model.projector(standardised) if model.projector is not None else standardised
        logits = model.classifier(hidden)
        nll = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
        loss = (item_weights * nll).sum() / item_weights.sum()
        loss = loss + l2 * sum((p**2).sum() for p in params if p.ndim > 1)
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


def fit_head(
    model: SERClassifier,
    train_features: np.ndarray,
    train_targets: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    class_names: list[str],
    l2_grid: tuple[float, ...],
    class_weighted: bool,
    seed: int,
) -> HeadFit:
    """Fit ``model``'s head on pooled features (its standardisation must already be set).

    ``train_targets`` [N, C] are per-item target distributions (one-hot for hard labels);
    ``val_labels`` are class indices. Leaves the best head's weights in ``model`` (eval mode).
    """
    n_classes = len(class_names)
    targets = torch.as_tensor(np.asarray(train_targets, dtype=np.float32))
    if class_weighted:
        weights = class_weights_from_counts(targets.sum(dim=0).numpy()) * n_classes
    else:
        weights = np.ones(n_classes)
    class_weights = torch.as_tensor(weights, dtype=torch.float32)
    inputs = torch.as_tensor(np.asarray(train_features, dtype=np.float32))
    val_inputs = torch.as_tensor(np.asarray(val_features, dtype=np.float32))
    model.eval()  # dropout off: L-BFGS needs a deterministic objective
    with torch.no_grad():  # the standardisation is fixed: apply it once, not at every step
        standardised = model.head_from_pooled(inputs).pooled
    best: tuple[float, float, dict, dict, float] | None = None
    val_ua_by_l2: dict[float, float] = {}
    threads = torch.get_num_threads()
    # These matrices are a few hundred kB: one thread is fastest (with the caller's 2 threads on
    # a busy 2-core machine every tiny op waited for the second core: 10x slower, measured).
    torch.set_num_threads(1)
    try:
        # A continuation path: strongest L2 first from the seeded initialisation, then each
        # weaker L2 starts from the previous optimum. Each objective is strictly convex, so the
        # optimum is the same as from scratch (to L-BFGS's tolerance), in fewer iterations.
        _reset_head(model, blake2b_seed(seed, "head"))
        for l2 in sorted(l2_grid, reverse=True):
            loss = _fit_one(model, standardised, targets, class_weights, float(l2))
            with torch.no_grad():
                predicted = model.head_from_pooled(val_inputs).logits.argmax(dim=-1).numpy()
            report = classification_report(np.asarray(val_labels), predicted, class_names)
            val_ua_by_l2[float(l2)] = float(report["ua"])
            if best is None or report["ua"] > best[0]:
                state = {
                    k: v.detach().clone() for k, v in model.state_dict().items() if _is_head(k)
                }
                best = (float(report["ua"]), float(l2), report, state, loss)
    finally:
        torch.set_num_threads(threads)
    assert best is not None  # l2_grid is validated non-empty
    model.load_state_dict(best[3], strict=False)
    return HeadFit(l2=best[1], val_report=best[2], val_ua_by_l2=val_ua_by_l2, train_loss=best[4])


def _is_head(key: str) -> bool:
    return key.startswith(("classifier.", "projector."))


@torch.no_grad()
def head_outputs(
    model: SERClassifier, pooled: np.ndarray, *, mc_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """``probs``, ``embedding`` (the standardised pooled features), ``penultimate`` and
    ``mc_probs`` [N, T, C] (T dropout samples on the head's input, seeded) from cached
    features: the same arrays ``training.scoring.score_batch`` returns from audio."""
    model.eval()
    inputs = torch.as_tensor(np.asarray(pooled, dtype=np.float32))
    output = model.head_from_pooled(inputs)
    probs = torch.softmax(output.logits.float(), dim=-1)
    samples = []
    if mc_samples:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(blake2b_seed(seed, "mc-dropout"))
            model.dropout.train()
            try:
                for _ in range(mc_samples):
                    logits = model.classifier(model.dropout(output.penultimate))
                    samples.append(torch.softmax(logits.float(), dim=-1))
            finally:
                model.eval()
    mc_probs = (
        torch.stack(samples, dim=1) if samples else probs.new_zeros(len(probs), 0, probs.shape[1])
    )
    return {
        "probs": probs.numpy().astype(np.float32),
        "embedding": output.pooled.float().numpy(),
        "penultimate": output.penultimate.float().numpy(),
        "mc_probs": mc_probs.numpy().astype(np.float32),
    }
