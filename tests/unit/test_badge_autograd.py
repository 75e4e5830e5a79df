"""BADGE's gradient embedding equals torch.autograd's gradient of the real classifier head.

BADGE (Ash et al., ICLR 2020) embeds an item by the gradient of the cross-entropy loss, taken at
the model's own prediction ``yhat = argmax p``, w.r.t. the weight of the last linear layer:

    g = dL/dW = (p - onehot(yhat)) (outer) h,    W: [C, P], h: the input of that layer

Conventions checked here (they are the code's, and they are the paper's):

- sign: ``g`` is the gradient of the loss itself (``+ (p - onehot)``), not its negative (the sign
  changes no distance, but the explicit version must equal the gradient, not its opposite);
- weight only: the bias gradient (``p - onehot``, C values) is not part of ``g``, as in the
  paper; ``g`` has ``C * P`` values;
- layout: ``g.reshape(C, P)`` is ``dL/dW`` in ``nn.Linear``'s ``[out, in]`` order, i.e. the
  flattening is row-major over (class, feature): ``g[c * P + j] = a[c] * h[j]``;
- ``h`` is ``ClassifierOutput.penultimate`` (what scoring stores): the input of
  ``model.classifier``; the head's dropout sits between them and is the identity in eval mode,
  where scoring runs.

The gradients come from autograd on the REAL head (``build_classifier`` on the tiny backbone,
``head_from_pooled``), and, end to end, from the waveform through the whole model against what
``score_batch`` returns. The fast kernel never forms ``g``; its norms, its distances to the first
center and its picks are held to the autograd gradients too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from after_ray.al.kernels.badge import BadgeStats, _residual, _Seeding, badge_kmeanspp
from after_ray.al.kernels.reference import badge_kmeanspp_explicit, gradient_embedding
from after_ray.al.pool import PoolView
from after_ray.al.strategies import get_strategy
from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.training.scoring import score_batch

N_CLASSES = 4


def _classifier(pooling: str, proj_size: int | None, *, seed: int = 0):
    cfg = dataclasses.replace(
        FinetuneConfig(), pooling=pooling, proj_size=proj_size, head_dropout=0.3, seed=seed
    )
    model = build_classifier(
        load_backbone(BackboneConfig(name_or_path="tiny", seed=seed), for_pretraining=False),
        N_CLASSES,
        cfg,
    )
    # A sharper head than the initialisation's (near-uniform probabilities would make every
    # residual alike): seeded weights of std 1.
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen))
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=gen))
    return model.eval()


def _autograd_weight_grads(model, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (dL/dW flattened row-major, dL/db) of CE at argmax, by autograd."""
    weight_grads, bias_grads = [], []
    for row in range(pooled.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model.head_from_pooled(pooled[row : row + 1]).logits
        label = logits.detach().argmax(dim=-1)
        F.cross_entropy(logits, label).backward()
        weight_grads.append(model.classifier.weight.grad.detach().reshape(-1).clone())
        bias_grads.append(model.classifier.bias.grad.detach().clone())
    return torch.stack(weight_grads).numpy(), torch.stack(bias_grads).numpy()


@pytest.mark.parametrize(
    ("pooling", "proj_size"), [("mean", None), ("mean", 8), ("attentive", 8), ("layer_stats", 6)]
)
def test_gradient_embedding_equals_autograd_of_the_real_head(pooling, proj_size):
    # float64 end to end: the comparison is then exact to ~1e-12, not float32's ~1e-6.
    model = _classifier(pooling, proj_size).double()
    width = model.pooled_size
    pooled = torch.randn(24, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = model.head_from_pooled(pooled)
        probs = torch.softmax(out.logits, dim=-1).numpy()
        h = out.penultimate.numpy()
    assert h.shape == (24, proj_size or width)
    assert len(set(probs.argmax(1).tolist())) >= 2  # the head predicts several classes

    grads_w, grads_b = _autograd_weight_grads(model, pooled)
    g = gradient_embedding(probs, h)
    assert g.shape == grads_w.shape == (24, N_CLASSES * h.shape[1])  # weight only: C * P values
    np.testing.assert_allclose(g, grads_w, rtol=1e-10, atol=1e-12)
    # Sign: the gradient itself, not its negative (a wrong sign would give -grads_w).
    assert np.abs(g + grads_w).max() > 1e-3
    # The bias gradient is the residual alone, and it is left out of g (the paper's choice).
    np.testing.assert_allclose(_residual(probs), grads_b, rtol=1e-10, atol=1e-12)
    # Row-major layout: g[c * P + j] = (p_c - [c == yhat]) * h_j.
    a = probs.copy()
    a[np.arange(24), probs.argmax(1)] -= 1.0
    np.testing.assert_allclose(g.reshape(24, N_CLASSES, -1), a[:, :, None] * h[:, None, :])


def test_fast_kernel_distances_and_picks_equal_those_of_the_autograd_gradients():
    model = _classifier("mean", 8).double()
    pooled = torch.randn(
        60, model.pooled_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    with torch.no_grad():
        out = model.head_from_pooled(pooled)
        probs = torch.softmax(out.logits, dim=-1).numpy()
        h = out.penultimate.numpy()
    grads, _ = _autograd_weight_grads(model, pooled)

    # The factorised state: ||g||^2 per row and the exact D2 to the first center.
    seeding = _Seeding(probs, h, np.arange(60), 5, 16, BadgeStats())
    norms = np.einsum("ij,ij->i", grads, grads)
    np.testing.assert_allclose(seeding.gn, norms, rtol=1e-10)
    first = int(seeding.picks[0])
    assert first == int(np.argmax(norms))  # the largest gradient norm is the first center
    d2 = ((grads - grads[first]) ** 2).sum(axis=1)
    np.testing.assert_allclose(seeding.d2, d2, rtol=1e-9, atol=1e-12)

    # Picks: the fast kernel on (probs, penultimate) = the explicit seeding on autograd's g.
    candidates = np.random.default_rng(3).random(60) < 0.7
    for seed in (0, 1, 2):
        fast = badge_kmeanspp(probs, h, 12, seed=seed, candidates=candidates)
        explicit = badge_kmeanspp_explicit(
            probs, h, 12, seed=seed, candidates=candidates, g=grads[candidates]
        )
        np.testing.assert_array_equal(fast, explicit)
    # And the strategy, as the runner calls it (unlabeled rows are the candidates).
    view = PoolView(
        utt_ids=np.asarray([f"u{i:03d}" for i in range(60)], dtype=object),
        labeled=~candidates,
        probs=probs,
        penultimate=h,
    )
    picked = get_strategy("badge").select(view, 12, seed=4)
    expected = badge_kmeanspp_explicit(
        probs, h, 12, seed=4, candidates=candidates, g=grads[candidates]
    )
    assert picked == view.utt_ids[expected].tolist()


def test_scored_penultimate_and_probs_give_the_gradient_of_the_whole_model():
    """End to end: waveform -> model (eval) -> CE at argmax -> dL/dW by autograd equals the
    embedding built from what ``score_batch`` stored (probs, penultimate)."""
    model = _classifier("mean", 8)
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([9000, 12000, 7000, 12000, 10000, 8000])
    values = torch.randn(6, 12000, generator=gen)
    mask = (torch.arange(12000)[None, :] < lengths[:, None]).long()
    batch = {
        "input_values": values * mask,
        "attention_mask": mask,
        "lengths": lengths,
        "utt_id": [f"w{i}" for i in range(6)],
    }
    scored = score_batch(model, batch, mc_samples=0, seed=0)
    grads = []
    for row in range(6):
        model.zero_grad(set_to_none=True)
        n = int(lengths[row])
        logits = model(values[row : row + 1, :n])  # the utterance alone, no padding
        F.cross_entropy(logits, logits.detach().argmax(-1)).backward()
        grads.append(model.classifier.weight.grad.reshape(-1).numpy().copy())
    g = gradient_embedding(scored["probs"], scored["penultimate"])
    # float32 model: the stored probabilities and features carry float32 rounding (~1e-7
    # relative) and the padded batch differs from the lone utterance by summation order.
    np.testing.assert_allclose(g, np.stack(grads), rtol=1e-4, atol=1e-5)
    assert np.abs(g).max() > 1e-2  # not a vanishing gradient compared with a vanishing one
