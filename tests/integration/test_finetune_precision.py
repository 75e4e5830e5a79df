"""Fine-tuning precision (fp32 / bf16 autocast / fp16 refused on the CPU), gradient accumulation
and the layer-wise learning rate, on the tiny preset."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from dtype_hooks import output_dtypes
from test_finetune import CLASS_NAMES, make_batches, tones
from torch import nn

from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.errors import ConfigError
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.training.finetune import (
    build_optimizer,
    finetune,
    make_cached_providers,
    train_one_epoch,
)

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
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(0)
    with output_dtypes(model) as seen:
        loss = train_one_epoch(
            model,
            optimizer,
            make_batches(items["train"], 4),
            n_classes=len(CLASS_NAMES),
            class_weights=None,
            cfg=cfg,
            epoch=0,
        )
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


def test_bf16_autocast_covers_training_on_cached_cnn_features(items):
    """The cached-features path (frozen CNN, its output cached once in fp32) trains its
    Transformer and head in bfloat16 too; the cache itself stays float32."""
    losses, caches = {}, {}
    for precision in ("bf16", "fp32"):
        cfg = FinetuneConfig(precision=precision, batch_size=4, **EXACT)
        model = _classifier(cfg)
        train, _, _ = make_cached_providers(
            cfg, model, make_batches(items["train"], 4), make_batches(items["val"], 4)
        )
        caches[precision] = train.cache
        with output_dtypes(model, (nn.Linear,)) as seen:
            losses[precision] = train_one_epoch(
                model,
                build_optimizer(cfg, model),
                train(0),
                n_classes=len(CLASS_NAMES),
                class_weights=None,
                cfg=cfg,
                epoch=0,
            )
        assert seen == {"Linear": {torch.bfloat16 if precision == "bf16" else torch.float32}}
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {v.dtype for v in caches["bf16"].values()} == {torch.float32}
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * abs(losses["fp32"])


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
    # What a round's finetune_summary.json holds (run_finetune's summary).
    from after_ray.distributed.train import _finetune_summary

    summary = _finetune_summary(accumulated, 12, None)
    assert (summary["effective_batch"], summary["precision"]) == (8, "fp32")

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


# ------------------------------------------------------------- accumulation under DDP (gloo)
# One rank of a 2-process gloo group (or a lone process): a DDP-wrapped tiny classifier trains 2
# epochs with batch argv[3] x accumulation argv[4] on its share of 16 fixed utterances; rank 0
# writes the weights and how often DDP's no_sync was entered to argv[1].
_DDP_RANK = """
import os, sys
import numpy as np, torch
from torch.nn.parallel import DistributedDataParallel
from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.training.finetune import build_optimizer, train_one_epoch

torch.set_num_threads(1)
out, world, batch, accumulation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
cfg = FinetuneConfig(batch_size=batch, grad_accumulation=accumulation, head_dropout=0.0,
    mask_time_prob=0.0, mask_channel_prob=0.0, class_weighted=False, lr=3e-3,
    freeze_feature_encoder=True)
nodrop = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    feat_proj_dropout=0.0, layerdrop=0.0)
model = build_classifier(load_backbone(BackboneConfig(name_or_path="tiny", **nodrop),
    for_pretraining=False), 3, cfg)
entered = []
if world > 1:
    model = DistributedDataParallel(model, find_unused_parameters=True)  # as Ray Train here
    no_sync = model.no_sync
    def counted():
        entered.append(1)
        return no_sync()
    model.no_sync = counted
rng = np.random.default_rng(0)
values = torch.from_numpy(rng.standard_normal((16, 6000)).astype(np.float32))
labels = torch.arange(16) % 3
mine = list(range(rank, 16, world))  # rank r: items r, r + world, ...
def batches():
    for start in range(0, len(mine), batch):
        rows = mine[start : start + batch]
        yield {"input_values": values[rows], "attention_mask": torch.ones(len(rows), 6000,
            dtype=torch.long), "utt_id": [str(i) for i in rows], "label_index": labels[rows]}
core = getattr(model, "module", model)
optimizer = build_optimizer(cfg, core)
for epoch in range(2):
    train_one_epoch(model, optimizer, batches(), n_classes=3, class_weights=None, cfg=cfg,
        epoch=epoch)
if rank == 0:
    torch.save({"weights": core.state_dict(), "no_sync": len(entered)}, out)
"""


def _ddp_run(tmp_path, name: str, world: int, batch: int, accumulation: int) -> dict:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / f"{name}.pt"
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _DDP_RANK,
                    str(out),
                    str(world),
                    str(batch),
                    str(accumulation),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.timeout(600)
def test_two_rank_ddp_accumulation_uses_no_sync_and_equals_one_process_with_the_whole_batch(
    tmp_path,
):
    """2 gloo ranks x batch 4 x accumulation 2 (8 items per rank, one step per epoch) against
    one process x batch 16: the same 2 steps on the same 16 items. The ranks enter no_sync once
    per step (the first micro-batch), and the weights agree (measured: within 2.7e-6; the same
    2 ranks without accumulation, 2 steps per epoch, are 0.018 away; tolerance 1e-4 absolute)."""
    ddp = _ddp_run(tmp_path, "ddp", 2, 4, 2)
    one = _ddp_run(tmp_path, "one", 1, 16, 1)
    assert ddp["no_sync"] == 2  # 2 epochs x 1 non-stepping micro-batch
    assert one["no_sync"] == 0
    gap = max(float((ddp["weights"][k] - one["weights"][k]).abs().max()) for k in one["weights"])
    assert gap <= 1e-4, gap
    initial = _classifier(FinetuneConfig(freeze_feature_encoder=True)).state_dict()
    moved = max(float((one["weights"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # it trained
