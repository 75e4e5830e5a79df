"""Fine-tuning precision (fp32 / bf16 autocast / fp16 refused on the CPU), gradient accumulation
and the layer-wise learning rate, on the tiny preset."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from test_finetune import CLASS_NAMES, make_batches, tones
from torch import nn

from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.errors import ConfigError
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.training.finetune import build_optimizer, finetune, train_one_epoch

# No randomness left in a training step: no dropout, no SpecAugment, no random crop (the
# utterances are shorter than max_duration_s) and equal lengths, so no padding either.
EXACT = dict(
    head_dropout=0.0,
    mask_time_prob=0.0,
    mask_channel_prob=0.0,
    class_weighted=False,
    early_stopping_patience=0,
    freeze_feature_encoder=True,
    lr=3e-3,
)
NO_DROPOUT = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
)


def _classifier(cfg: FinetuneConfig, seed: int = 0):
    backbone = load_backbone(
        BackboneConfig(name_or_path="tiny", seed=seed, **NO_DROPOUT), for_pretraining=False
    )
    return build_classifier(backbone, len(CLASS_NAMES), cfg)


def _equal_length(items, n: int = 8000):
    return [(u, x[:n].copy(), y) for u, x, y in items]


@pytest.fixture(scope="module")
def items():
    return {"train": _equal_length(tones(4, 1)), "val": _equal_length(tones(2, 2))}


# ----------------------------------------------------------------------------- precision
def _one_epoch_with_dtype_hooks(precision: str, items):
    cfg = FinetuneConfig(precision=precision, batch_size=4, **EXACT)
    model = _classifier(cfg)
    seen: dict[str, set[torch.dtype]] = {"Linear": set(), "Conv1d": set()}

    def hook(module, _inputs, output):
        seen[type(module).__name__].add(output.dtype)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Linear, nn.Conv1d)
    ]
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(0)
    loss = train_one_epoch(
        model,
        optimizer,
        make_batches(items["train"], 4),
        n_classes=len(CLASS_NAMES),
        class_weights=None,
        cfg=cfg,
        epoch=0,
    )
    for handle in handles:
        handle.remove()
    return loss, seen, {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def test_bf16_autocast_runs_in_bfloat16_and_keeps_weights_fp32(items):
    """``finetune.precision: bf16`` autocasts the training forward pass (Linear and Conv1d
    outputs are bfloat16), the weights stay float32, and the loss moves a little; ``auto`` on
    a CPU is fp32 bit for bit."""
    bf16_loss, bf16_seen, bf16_weights, bf16_model = _one_epoch_with_dtype_hooks("bf16", items)
    fp32_loss, fp32_seen, fp32_weights, _ = _one_epoch_with_dtype_hooks("fp32", items)
    auto_loss, auto_seen, auto_weights, _ = _one_epoch_with_dtype_hooks("auto", items)

    assert bf16_seen == {"Linear": {torch.bfloat16}, "Conv1d": {torch.bfloat16}}
    assert fp32_seen == {"Linear": {torch.float32}, "Conv1d": {torch.float32}}
    assert auto_seen == fp32_seen
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert all(v.dtype == fp32_weights[k].dtype for k, v in bf16_weights.items())
    assert math.isfinite(bf16_loss) and math.isfinite(fp32_loss)
    assert bf16_loss != fp32_loss
    # Measured: |bf16 - fp32| / fp32 = 5.1e-4 on this epoch (3 steps); tolerance 2%.
    assert abs(bf16_loss - fp32_loss) <= 0.02 * abs(fp32_loss)
    assert any(not torch.equal(bf16_weights[k], fp32_weights[k]) for k in fp32_weights)
    assert auto_loss == fp32_loss
    assert all(torch.equal(auto_weights[k], fp32_weights[k]) for k in fp32_weights)


def test_fp16_on_the_cpu_is_refused_at_start_and_says_to_use_bf16(items):
    cfg = FinetuneConfig(precision="fp16", epochs=1, **EXACT)
    model = _classifier(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*use precision bf16"):
        finetune(
            cfg,
            model,
            lambda epoch: make_batches(items["train"], 4),
            lambda: make_batches(items["val"], 4),
            CLASS_NAMES,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing ran
    assert FinetuneConfig(precision="fp64").validate() == [  # type: ignore[arg-type]
        "finetune.precision: must be auto, fp32, bf16 or fp16, got 'fp64'"
    ]


# -------------------------------------------------------------------- gradient accumulation
def _run(items, batch_size: int, accumulation: int, epochs: int = 3):
    cfg = FinetuneConfig(
        epochs=epochs, batch_size=batch_size, grad_accumulation=accumulation, **EXACT
    )
    model = _classifier(cfg)
    steps = []
    result = None
    optimizer_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return optimizer_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", counted)
        result = finetune(
            cfg,
            model,
            lambda epoch: make_batches(items["train"], batch_size),  # the same order every run
            lambda: make_batches(items["val"], 6),
            CLASS_NAMES,
        )
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}, len(steps)


def test_batch_4_with_accumulation_2_equals_batch_8(items, caplog):
    """12 utterances: batch 8 steps on [8, 4] items per epoch; batch 4 x 2 accumulates
    [4+4, 4] (the last group has one batch and still steps, rescaled to its mean), so both take
    the same 2 steps per epoch on the same gradients. Measured: training losses within 5e-8,
    weights within 1e-6; tolerance 1e-5 / 1e-4 absolute (summation order, amplified by AdamW
    where a gradient is near zero). Batch 4 without accumulation (3 steps an epoch) is 0.023 away in weights."""
    assert len(items["train"]) == 12
    with caplog.at_level(logging.INFO, logger="after_ray.training.finetune"):
        accumulated, acc_weights, acc_steps = _run(items, 4, 2)
    reference, ref_weights, ref_steps = _run(items, 8, 1)
    plain, plain_weights, plain_steps = _run(items, 4, 1)

    assert acc_steps == ref_steps == 3 * 2 and plain_steps == 3 * 3
    assert accumulated.effective_batch == reference.effective_batch == 8
    assert plain.effective_batch == 4
    lines = [r.getMessage() for r in caplog.records if "effective batch" in r.getMessage()]
    assert len(lines) == 1  # once per fine-tune
    assert "effective batch 8 = batch_size 4 x grad_accumulation 2 x 1 worker(s)" in lines[0]

    acc_losses = [r.train_loss for r in accumulated.history]
    ref_losses = [r.train_loss for r in reference.history]
    np.testing.assert_allclose(acc_losses, ref_losses, atol=1e-5, rtol=0)
    assert ref_losses[-1] < ref_losses[0]  # it trained
    for key in ref_weights:
        np.testing.assert_allclose(acc_weights[key], ref_weights[key], atol=1e-4, rtol=0)
    gap = max(float((plain_weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)
    assert gap > 1e-3  # without accumulation the runs part: the comparison has power


def test_grad_accumulation_must_be_a_positive_integer():
    assert FinetuneConfig(grad_accumulation=0).validate() == [
        "finetune.grad_accumulation: must be an integer >= 1 (1 = a step every batch), got 0"
    ]


# ---------------------------------------------------------------------- layer-wise lr
def test_backbone_lr_gives_two_param_groups_covering_every_trainable_parameter_once():
    cfg = FinetuneConfig(lr=1e-4, backbone_lr=1e-5, freeze_feature_encoder=True, proj_size=16)
    model = _classifier(cfg)
    optimizer = build_optimizer(cfg, model)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-5]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) == len(trainable)
    assert set(grouped) == set(trainable)
    backbone = {id(p) for p in model.backbone.parameters()}
    head, body = optimizer.param_groups
    assert all(id(p) not in backbone for p in head["params"]) and head["params"]
    assert all(id(p) in backbone for p in body["params"]) and body["params"]
    # The frozen CNN is in neither group.
    cnn = {id(p) for p in model.backbone.feature_extractor.parameters()}
    assert not cnn & set(grouped)

    single = build_optimizer(FinetuneConfig(lr=1e-4), model)
    assert [g["lr"] for g in single.param_groups] == [1e-4]
    assert {id(p) for p in single.param_groups[0]["params"]} == set(trainable)
    assert FinetuneConfig(backbone_lr=0.0).validate() == [
        "finetune.backbone_lr: must be positive or null (= lr), got 0.0"
    ]
