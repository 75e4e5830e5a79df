"""Settings of the backbone (``backbone:``) and of task-adaptive pre-training (``tapt:``).

Torch-free on purpose: reading and validating a config must not import torch or transformers.

The TAPT defaults are the values that made the *tiny* from-scratch preset learn on the
synthesized demo corpus (BRIEF, "TAPT recipe"): with near-default wav2vec2 settings (65% masking
in spans of 10, 100 negatives) its contrastive loss sat at chance for hundreds of steps, while
masking 30% in spans of 2, 10 negatives, lr 2e-3 and a Gumbel temperature annealed 2 -> 0.5 left
the plateau after ~175 steps. A real pre-trained checkpoint gets its own values from its
training recipe (``backbone.recipe: auto``, ``after_ray.config.recipes``: AFTER's lr 1e-4 and
20,000 steps with wav2vec2's 65% masking in spans of 10 and 100 negatives). AFTER itself masked
only ~5% of frames (transformers' defaults 0.05 / 10) and left the Gumbel temperature at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BACKBONE_FAMILIES = ("auto", "wav2vec2", "hubert", "wavlm")


@dataclass
class BackboneConfig:
    """Which speech encoder is used, and how it is loaded.

    ``name_or_path`` is one of three things, tried in this order:

    * a preset name (``tiny``, ``base``, ``large``, optionally suffixed ``-hubert`` / ``-wavlm``,
      see ``after_ray.models.backbones.PRESETS``): a randomly initialised model of that shape,
      deterministic from ``seed``. ``tiny`` is the offline default (nothing can be downloaded);
    * a local directory written by ``save_pretrained`` / ``save_backbone`` (a TAPT output, or a
      Hugging Face checkpoint copied to disk);
    * a Hugging Face hub id such as ``facebook/wav2vec2-base``, passed to ``from_pretrained`` as
      it is (it downloads only where the machine may, and the hub cache is used when offline).
    """

    name_or_path: str = "tiny"
    # Training recipe (TAPT and fine-tuning values, after_ray.config.recipes): "auto" picks it
    # from the backbone's size and family (a preset's name, a checkpoint's config.json, a hub
    # id's name); a recipe name (tiny, base-wav2vec2, large-hubert, ...) forces one; "none"
    # keeps the dataclass defaults (= tiny). Keys you set in tapt:/finetune: always win.
    recipe: str = "auto"
    # "auto" reads the family from the checkpoint's config.json (model_type). Naming a family
    # explicitly turns a preset into that family ("tiny" + "hubert" = "tiny-hubert") and, for a
    # checkpoint, is checked against model_type so a wrong guess fails loudly.
    family: Literal["auto", "wav2vec2", "hubert", "wavlm"] = "auto"
    # Freeze the CNN feature encoder. "auto" = freeze only for real pre-trained checkpoints, and
    # only when fine-tuning: never for a model that started from a preset (freezing always hurt
    # the tiny from-scratch model: chance from scratch, 45% vs 63% UA after TAPT), and never
    # during TAPT (AFTER's TAPT updated every parameter).
    freeze_feature_encoder: bool | Literal["auto"] = "auto"
    # Seed of every randomly initialised weight: a preset's, and the heads a checkpoint lacks
    # (e.g. the quantizer when a plain encoder checkpoint is loaded for wav2vec2 pre-training).
    seed: int = 0
    # Optional overrides of the model's regularisation (None = keep the preset's / checkpoint's).
    # layerdrop > 0 leaves layers unused in some steps, which plain DDP rejects: keep it 0 (or
    # enable find_unused_parameters) when training on several workers.
    hidden_dropout: float | None = None
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    feat_proj_dropout: float | None = None
    layerdrop: float | None = None

    def identity(self) -> dict:
        """What names the backbone in run and cache keys. ``recipe`` is left out: it only picks
        tapt/finetune values, which the keys hold themselves (and run directories written before
        the key existed keep resuming)."""
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k != "recipe"}

    def dropout_overrides(self) -> dict[str, float]:
        """The overrides that are set, as config keyword arguments."""
        names = (
            "hidden_dropout",
            "attention_dropout",
            "activation_dropout",
            "feat_proj_dropout",
            "layerdrop",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.name_or_path or not self.name_or_path.strip():
            problems.append(
                "backbone.name_or_path: must not be empty (use a preset such as 'tiny', a local "
                "checkpoint directory or a hub id)"
            )
        from after_ray.config.recipes import RECIPE_CHOICES

        if self.recipe not in RECIPE_CHOICES:
            problems.append(
                f"backbone.recipe: unknown recipe {self.recipe!r}; choose one of "
                f"{', '.join(RECIPE_CHOICES)}"
            )
        for name, value in self.dropout_overrides().items():
            if not 0.0 <= value < 1.0:
                problems.append(
                    f"backbone.{name}: must be in [0, 1) or null (keep the model's), got {value}"
                )
        return problems


@dataclass
class TaptConfig:
    """Task-adaptive pre-training: continue the backbone's self-supervised objective on the
    unlabeled target corpus before any label is bought.

    wav2vec2 backbones continue their own contrastive + diversity objective (quantizer
    included). HuBERT and WavLM continue masked prediction of cluster ids; the targets come from
    k-means over the model's own intermediate features on the TAPT corpus, computed by a frozen
    copy of the model as it was when TAPT started (targets that moved with the student would let
    it collapse them to one cluster).
    """

    # Run the TAPT stage at all (false: fine-tune straight from the backbone).
    enabled: bool = True
    # Optimizer steps. 400 is what the tiny preset needed on the demo corpus: its contrastive
    # loss leaves the chance plateau after ~175 steps and UA after 400 steps was 65-67% vs 56-65%
    # from scratch. AFTER ran 20,000 steps on wav2vec2-base.
    steps: int = 400
    # Utterances per step and worker (under DDP the effective batch is batch_size x workers).
    batch_size: int = 8
    # AdamW peak learning rate. 2e-3 suits the 0.1M-parameter tiny model; use 1e-4 or lower for a
    # real pre-trained checkpoint (AFTER: Adam 1e-4), or its representation is destroyed.
    lr: float = 2.0e-3
    # Linear warm-up from 0 to lr over this many steps (10% of the default steps).
    warmup_steps: int = 40
    # Shape of the decay after warm-up, down to min_lr_ratio x lr at the last step. Linear is
    # what AFTER and fairseq's wav2vec2 recipe use.
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    # Decoupled weight decay. 0: AFTER used none, and the tiny model is under-, not over-fitted.
    weight_decay: float = 0.0
    # Adam moments as in fairseq's wav2vec2 pre-training (0.9, 0.98, eps 1e-6).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1.0e-6
    # Clip the global gradient norm (None = off). The summed-then-normalised contrastive loss
    # has occasional spikes on a from-scratch model; 1.0 keeps them harmless.
    grad_clip: float | None = 1.0

    # Masking: roughly mask_prob of each utterance's valid frames is masked, in spans of
    # mask_length frames (Hugging Face semantics: number of spans = mask_prob x frames /
    # mask_length, rounded at random, so overlapping spans make the masked share a bit smaller).
    # 0.3 / 2 is the tiny preset's working value; wav2vec2's own pre-training uses 0.65 / 10.
    mask_prob: float = 0.3
    mask_length: int = 2
    # At least this many spans per utterance (utterances shorter than a span are masked whole,
    # minus one frame so that a negative exists). 2 is Hugging Face's default.
    min_masks: int = 2
    # wav2vec2 only: distractors per masked frame, drawn uniformly from the same utterance's
    # valid (non-padded) frames other than the positive. 10 worked for the tiny model (100, the
    # wav2vec2 default, kept it at chance).
    num_negatives: int = 10
    # wav2vec2 only: Gumbel-softmax temperature of the quantizer, annealed geometrically from
    # start to end over the run (fairseq's schedule shape, 2 -> 0.5). AFTER left it fixed at 1.
    gumbel_temperature_start: float = 2.0
    gumbel_temperature_end: float = 0.5
    # wav2vec2 only: weight of the codebook-diversity loss (wav2vec2's alpha = 0.1). Both terms
    # are per masked frame, unlike transformers' summed loss (which made the diversity term
    # negligible in AFTER's code).
    diversity_loss_weight: float = 0.1

    # Hand a resumable state to the caller every this many steps (and after the last step).
    checkpoint_every: int = 100
    # Report averaged metrics every this many steps.
    log_every: int = 10
    # Seeds masks, negatives, dropout and Gumbel noise. Everything random is derived from
    # (seed, worker rank, step), so a resumed run equals an uninterrupted one.
    seed: int = 0
    # "auto" = bf16 autocast on a GPU, fp32 on CPU (CPU bf16 autocast is slow and gains nothing
    # for a model this small). "bf16" on CPU is allowed for testing the GPU code path.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    # HuBERT / WavLM only: k-means clusters that serve as targets. 50 suits a small corpus and
    # the tiny model (HuBERT's first iteration used 100 on 960 h of speech).
    hubert_num_clusters: int = 50
    # Lloyd iterations of the FAISS k-means.
    hubert_kmeans_iters: int = 25
    # Batches read (before training) to collect frames for k-means, and the most frames kept.
    hubert_kmeans_batches: int = 16
    hubert_kmeans_max_frames: int = 100_000
    # Which representation is clustered: 0 = the transformer input (projected CNN features plus
    # positional convolution), n = output of transformer layer n. None = half the depth (layer 6
    # of 12 as in HuBERT's second iteration; layer 1 of the tiny model's 2).
    hubert_feature_layer: int | None = None
    # Prediction head: projection to this many dims (None = the hidden size), cosine similarity
    # to one learned embedding per cluster, divided by this temperature (HuBERT: 0.1).
    hubert_proj_dim: int | None = None
    hubert_logit_temperature: float = 0.1

    def validate(self) -> list[str]:
        problems: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(f"tapt.{message}")

        need(self.steps >= 1, f"steps: must be at least 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}")
        need(self.lr > 0, f"lr: must be positive, got {self.lr} (tiny: 2e-3, base: 1e-4)")
        need(
            0 <= self.warmup_steps <= self.steps,
            f"warmup_steps: must be between 0 and steps ({self.steps}), got {self.warmup_steps}",
        )
        need(
            0.0 <= self.min_lr_ratio <= 1.0,
            f"min_lr_ratio: must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}",
        )
        need(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, f"{name}: must be in [0, 1), got {value}")
        need(self.adam_eps > 0, f"adam_eps: must be positive, got {self.adam_eps}")
        need(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip: must be positive or null (off), got {self.grad_clip}",
        )
        need(
            0.0 < self.mask_prob < 1.0,
            f"mask_prob: must be in (0, 1), got {self.mask_prob} (tiny: 0.3, wav2vec2: 0.65)",
        )
        need(
            self.mask_length >= 1,
            f"mask_length: must be at least 1 frame, got {self.mask_length}",
        )
        need(self.min_masks >= 0, f"min_masks: must be >= 0, got {self.min_masks}")
        need(
            self.num_negatives >= 1,
            f"num_negatives: must be at least 1, got {self.num_negatives} (tiny: 10)",
        )
        for name in ("gumbel_temperature_start", "gumbel_temperature_end"):
            value = getattr(self, name)
            need(value > 0, f"{name}: must be positive, got {value} (default 2.0 -> 0.5)")
        need(
            self.diversity_loss_weight >= 0,
            f"diversity_loss_weight: must be >= 0, got {self.diversity_loss_weight}",
        )
        need(
            self.checkpoint_every >= 1,
            f"checkpoint_every: must be at least 1 step, got {self.checkpoint_every}",
        )
        need(self.log_every >= 1, f"log_every: must be at least 1 step, got {self.log_every}")
        need(
            self.hubert_num_clusters >= 2,
            f"hubert_num_clusters: need at least 2 clusters, got {self.hubert_num_clusters}",
        )
        need(
            self.hubert_kmeans_iters >= 1,
            f"hubert_kmeans_iters: must be at least 1, got {self.hubert_kmeans_iters}",
        )
        need(
            self.hubert_kmeans_batches >= 1,
            f"hubert_kmeans_batches: must be at least 1, got {self.hubert_kmeans_batches}",
        )
        need(
            self.hubert_kmeans_max_frames >= self.hubert_num_clusters,
            "hubert_kmeans_max_frames: must be at least hubert_num_clusters "
            f"({self.hubert_num_clusters}), got {self.hubert_kmeans_max_frames}",
        )
        need(
            self.hubert_feature_layer is None or self.hubert_feature_layer >= 0,
            "hubert_feature_layer: must be >= 0 (0 = transformer input) or null (half depth), "
            f"got {self.hubert_feature_layer}",
        )
        need(
            self.hubert_proj_dim is None or self.hubert_proj_dim >= 1,
            f"hubert_proj_dim: must be positive or null (hidden size), got {self.hubert_proj_dim}",
        )
        need(
            self.hubert_logit_temperature > 0,
            f"hubert_logit_temperature: must be positive, got {self.hubert_logit_temperature}",
        )
        return problems
