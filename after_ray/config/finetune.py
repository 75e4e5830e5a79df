"""Settings of the per-round SER fine-tuning (the ``finetune:`` section of the config).

Torch-free on purpose: reading and validating a config must not import torch.

The defaults suit the *tiny* backbone preset (hidden 64, 2 layers) on a 2-core machine, which is
what the demo runs; the measured reference is 15 epochs from scratch reaching 55-65% UA on the
synthesized 4-emotion corpus (see BRIEF). A real pre-trained checkpoint gets AFTER's values
from its training recipe (``backbone.recipe: auto``, ``after_ray.config.recipes``: lr 1e-4,
30 epochs, frozen CNN, SpecAugment 0.08 x 15 frames / 0.05 x 64 channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class FinetuneConfig:
    """How the SER classifier is trained on the labeled set in every AL round."""

    epochs: int = 15
    batch_size: int = 16
    # Adam(W) learning rate, constant. 1e-3 suits the tiny preset; AFTER used 1e-4 for base.
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    # Learning rate of the backbone's parameters (None = lr for every parameter): the head gets
    # lr, the wav2vec2/HuBERT/WavLM model backbone_lr (SpeechBrain's IEMOCAP recipe: 1e-4 / 1e-5).
    backbone_lr: float | None = None
    # Optimizer step every this many batches (loss scaled 1/N; the epoch's last, partial group
    # steps too): the effective batch is batch_size x grad_accumulation x workers.
    grad_accumulation: int = 1
    # Autocast of the training forward pass and loss; weights and optimizer state stay fp32.
    # "auto" = bf16 on a CUDA device, fp32 on the CPU (after_ray.training.precision, as TAPT);
    # "bf16" on the CPU is allowed (to test that path); "fp16" needs CUDA (with a GradScaler).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Gradient-norm clipping (None = off). Guards the from-scratch tiny model against spikes.
    max_grad_norm: float | None = 1.0
    # Stop after this many epochs without a better validation UA (0 = never stop early). The
    # weights of the best epoch are kept either way (AFTER kept the last epoch's).
    early_stopping_patience: int = 5
    # Training crop length in seconds (AFTER: 10 s, kept from the start; we crop at random).
    max_duration_s: float = 10.0

    # What is trained: "full" = the backbone and the head on audio (AFTER's fine-tuning);
    # "head" = the backbone stays frozen (the TAPT model as it is), one pass over the corpus
    # caches each utterance's pooled features, and every round trains only the head on that
    # cache, in the driver, in about a second (SUPERB's frozen-upstream protocol). "head" needs
    # pooling "layer_stats" or "mean" and is what the demo and `after-ray bench al` use: rounds
    # then cost a fraction of a full-data fine-tune, and seeds move UA by ~1 point, not ~5.
    mode: Literal["full", "head"] = "full"
    # L2 strengths tried by the "head" trainer (class-weighted logistic regression, full-batch
    # L-BFGS); the one with the best validation UA is kept, like the best epoch in "full".
    head_l2_grid: tuple[float, ...] = (1.0e-3, 1.0e-2, 1.0e-1)
    # Head mode: z-score every feature per speaker (over all of that speaker's utterances, no
    # label used) before the head and before any distance, as SER systems normalise per speaker:
    # otherwise k-center and clustering cover voices, not emotions. Needs the manifest's speaker
    # column; utterances without a speaker keep the pool-wide standardisation.
    speaker_norm: bool = False

    # Head: pooling over valid frames -> dropout -> linear. "layer_stats" pools the mean and std
    # of every layer (CNN output, projection, each Transformer layer): what a frozen backbone's
    # head should see (SUPERB weights layers; emotion lives in prosody, i.e. in the spread of
    # the early layers as much as in the last layer's mean). It cannot be exported to HF.
    pooling: Literal["mean", "attentive", "layer_stats"] = "mean"
    head_dropout: float = 0.1
    # Optional linear projection before the classifier (None = none). It lowers the size of the
    # penultimate features that BADGE multiplies by the class count. Only "mean" pooling can be
    # exported to Hugging Face (its projector/classifier head is linear, then mean, then linear).
    proj_size: int | None = None

    # Freeze the CNN feature encoder while fine-tuning: true, false, or "auto" = keep what
    # backbone.freeze_feature_encoder decided when the backbone was loaded (its own "auto"
    # freezes real pre-trained checkpoints and never a model that started from a preset).
    # Freezing always hurt the tiny preset (from scratch: chance; after TAPT: 45% vs 63% UA),
    # while AFTER froze it for wav2vec2-base.
    freeze_feature_encoder: bool | Literal["auto"] = "auto"

    # SpecAugment on the encoder input, training only, valid frames only. Frames are 20 ms for
    # every wav2vec2-family model, so the time mask keeps its meaning across sizes; it is shorter
    # here than AFTER's 15 frames (300 ms) because the demo's utterances are ~2 s, not ~4.5 s.
    # The channel mask span is AFTER's 64 of 768 dims scaled to the tiny model's 64 dims.
    # These tiny-preset values are scaled from AFTER's, not tuned.
    mask_time_prob: float = 0.05
    mask_time_length: int = 5
    mask_time_min_masks: int = 1
    mask_channel_prob: float = 0.05
    mask_channel_length: int = 5

    # Cross-entropy weights from the inverse class frequencies of the CURRENT labeled set.
    class_weighted: bool = True
    # How annotator votes become targets: "majority" (hard label), "distribution" (soft
    # cross-entropy on the vote distribution) or "sample" (a vote drawn afresh every epoch,
    # seeded per utterance: AFTER's inherited stochastic soft labels).
    label_aggregation: Literal["majority", "distribution", "sample"] = "majority"
    # Where each round starts: "tapt" = cold start from the TAPT checkpoint (AFTER), "warm" = from
    # the previous round's fine-tuned model.
    init: Literal["tapt", "warm"] = "tapt"
    seed: int = 0
    # With a frozen CNN encoder, compute its output once per utterance and train the rest on the
    # cache (full utterances cached; training crops are taken in frames). No effect when unfrozen.
    cache_features: bool = True
    # Storage type of cached CNN features: float16 halves the memory (wav2vec2-base: ~100 kB per
    # second of audio in float32).
    cache_dtype: Literal["float32", "float16"] = "float32"
    # A resumable checkpoint every N epochs (0 = none): a lost worker or driver then continues
    # from it instead of starting the round's fine-tuning again. Each holds the weights, the best
    # weights so far and the optimizer state, about 4x the model (1.2 GB for wav2vec2-base).
    checkpoint_every: int = 1

    def validate(self) -> list[str]:
        problems: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(f"finetune.{message}")

        need(self.mode in ("full", "head"), f"mode: must be 'full' or 'head', got {self.mode!r}")
        need(
            self.mode != "head" or self.pooling in ("mean", "layer_stats"),
            f"pooling: mode 'head' trains on cached pooled features, so it needs pooling "
            f"'layer_stats' or 'mean', got {self.pooling!r}",
        )
        need(
            len(self.head_l2_grid) >= 1 and all(v >= 0 for v in self.head_l2_grid),
            f"head_l2_grid: must list one or more L2 strengths >= 0, got {list(self.head_l2_grid)}",
        )
        need(self.epochs >= 1, f"epochs: must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}")
        need(
            self.checkpoint_every >= 0,
            f"checkpoint_every: must be >= 0 epochs (0 = no checkpoints), got "
            f"{self.checkpoint_every}",
        )
        need(self.lr > 0, f"lr: must be positive, got {self.lr} (tiny: 1e-3, base: 1e-4)")
        need(
            self.backbone_lr is None or self.backbone_lr > 0,
            f"backbone_lr: must be positive or null (= lr), got {self.backbone_lr}",
        )
        need(
            isinstance(self.grad_accumulation, int) and self.grad_accumulation >= 1,
            f"grad_accumulation: must be an integer >= 1 (1 = a step every batch), got "
            f"{self.grad_accumulation!r}",
        )
        need(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            f"precision: must be auto, fp32, bf16 or fp16, got {self.precision!r}",
        )
        need(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm: must be positive or null (off), got {self.max_grad_norm}",
        )
        need(
            self.early_stopping_patience >= 0,
            "early_stopping_patience: must be >= 0 (0 disables early stopping), "
            f"got {self.early_stopping_patience}",
        )
        need(
            self.max_duration_s > 0,
            f"max_duration_s: must be positive seconds, got {self.max_duration_s}",
        )
        need(
            0.0 <= self.head_dropout < 1.0,
            f"head_dropout: must be in [0, 1), got {self.head_dropout}",
        )
        need(
            self.proj_size is None or self.proj_size >= 1,
            f"proj_size: must be a positive size or null (no projection), got {self.proj_size}",
        )
        for name in ("mask_time_prob", "mask_channel_prob"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, f"{name}: must be in [0, 1) (0 disables it), got {value}")
        for name in ("mask_time_length", "mask_channel_length"):
            value = getattr(self, name)
            need(value >= 1, f"{name}: must be at least 1 frame/channel, got {value}")
        need(
            self.mask_time_min_masks >= 0,
            f"mask_time_min_masks: must be >= 0, got {self.mask_time_min_masks}",
        )
        return problems
