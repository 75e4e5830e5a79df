"""Training recipes per backbone: the TAPT and fine-tuning values that suit a model's size and
family, picked from the backbone (``backbone.recipe: auto``) and filled in under the user's own
values (a key set in the YAML or on the command line always wins).

Torch-free on purpose: it runs while a config is read. The size and family come from the preset
name, from a local checkpoint's ``config.json`` (``model_type``, ``hidden_size``), or from a hub
id's name (``facebook/wav2vec2-base``, ``microsoft/wavlm-large``).

The dataclass defaults of ``TaptConfig`` and ``FinetuneConfig`` ARE the tiny recipe (the values
that made the tiny from-scratch preset learn on the demo corpus, see their comments), so the
``tiny`` recipe changes nothing and the demo's configs resolve exactly as before. Every other
value below names its source.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIZES = ("tiny", "base", "large")
FAMILIES = ("wav2vec2", "hubert", "wavlm")
# Hidden sizes at or below these belong to the size (tiny 64, base 768, large 1024).
_SIZE_BY_HIDDEN = ((256, "tiny"), (768, "base"))


class RecipeWarning(UserWarning):
    """A pre-trained checkpoint is about to be trained with values meant for the tiny model."""


@dataclass(frozen=True)
class Recipe:
    name: str
    tapt: Mapping[str, Any] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)
    # TAPT warm-up as a share of tapt.steps, used unless the user sets warmup_steps (so a user's
    # shorter run keeps a proportional warm-up).
    tapt_warmup_fraction: float | None = None


# --- TAPT -----------------------------------------------------------------------------------
# Shared by every pre-trained checkpoint: AFTER's optimisation of TAPT (after-method.md section
# 1: Adam lr 1e-4, 20,000 steps, no weight decay) with fairseq's schedule shape (polynomial decay
# of power 1 = linear, to 0, after a warm-up of 32,000 of 400,000 updates = 8%;
# wav2vec2_base_librispeech.yaml / hubert_base_librispeech.yaml).
_TAPT_PRETRAINED = {"lr": 1.0e-4, "steps": 20_000, "lr_schedule": "linear", "min_lr_ratio": 0.0}
_WARMUP_FRACTION = 32_000 / 400_000
# wav2vec2's own pre-training objective (fairseq wav2vec2_base_librispeech.yaml: mask_prob 0.65,
# mask_length 10, num_negatives 100, diversity weight 0.1). The Gumbel temperature is held at the
# value the checkpoint finished pre-training with: base anneals 2 -> 0.5 (latent_temp
# [2, 0.5, 0.999995]) and had reached the floor 0.5; large (wav2vec2_large_librivox.yaml,
# latent_temp [2, 0.1, 0.999995]) reached 0.1. Re-annealing from 2 would re-randomise a trained
# codebook's choices.
_TAPT_WAV2VEC2 = {
    "mask_prob": 0.65,
    "mask_length": 10,
    "num_negatives": 100,
    "diversity_loss_weight": 0.1,
}
# HuBERT's masked prediction (fairseq hubert_base_librispeech.yaml: mask_prob 0.80, mask_length
# 10, logit temperature 0.1); targets: 500 k-means clusters of layer-6 features, as HuBERT's
# second iteration (Hsu et al. 2021, section IV-C). WavLM keeps HuBERT's objective and masking
# (Chen et al. 2022, section III-A).
_TAPT_HUBERT = {
    "mask_prob": 0.8,
    "mask_length": 10,
    "hubert_num_clusters": 500,
    "hubert_logit_temperature": 0.1,
}

# --- fine-tuning ----------------------------------------------------------------------------
# AFTER's fine-tuning of wav2vec2-base (after-method.md section 4 and its re-implementation
# notes: Adam 1e-4, 30 epochs, CNN frozen, SpecAugment time 0.08 x 15 frames, channel 0.05 x 64,
# min 2 time masks); the CNN frozen as in SpeechBrain's IEMOCAP recipe ("worth about 2%") and
# Hugging Face's run_audio_classification (--freeze_feature_encoder, default True); a 256-wide
# projector before the classifier as in Hugging Face's classifier_proj_size and s3prl's emotion
# head. Layer-wise learning rates as in SpeechBrain's IEMOCAP emotion recipe
# (recipes/IEMOCAP/emotion_recognition/hparams/train_with_wav2vec2.yaml: lr 1e-4 for the head,
# lr_wav2vec2 1e-5 for the wav2vec2 model).
_FINETUNE_BASE = {
    "lr": 1.0e-4,
    "backbone_lr": 1.0e-5,
    "epochs": 30,
    "freeze_feature_encoder": True,
    "proj_size": 256,
    "mask_time_prob": 0.08,
    "mask_time_length": 15,
    "mask_time_min_masks": 2,
    "mask_channel_prob": 0.05,
    "mask_channel_length": 64,
}
# Large models: no source above fine-tuned a large model for SER with published values; this is
# our choice, marked as such: base's recipe at half the learning rate (fairseq's own large/base
# ratio for pre-training is 3e-4 / 5e-4 = 0.6) and the channel mask scaled to 1024 dims; the
# backbone at 5e-6, half of base's SpeechBrain 1e-5 (also our choice).
_FINETUNE_LARGE = {
    **_FINETUNE_BASE,
    "lr": 5.0e-5,
    "backbone_lr": 5.0e-6,
    "mask_channel_length": 85,
}


def _recipes() -> dict[str, Recipe]:
    recipes = {"tiny": Recipe("tiny")}
    for size in ("base", "large"):
        for family in FAMILIES:
            objective = _TAPT_WAV2VEC2 if family == "wav2vec2" else _TAPT_HUBERT
            tapt = {**_TAPT_PRETRAINED, **objective}
            if family == "wav2vec2":
                temperature = 0.5 if size == "base" else 0.1
                tapt["gumbel_temperature_start"] = tapt["gumbel_temperature_end"] = temperature
            if size == "large":
                # fairseq's large pre-training lr is 0.6x base's (3e-4 vs 5e-4): same for TAPT.
                tapt["lr"] = 6.0e-5
                if family != "wav2vec2":
                    tapt["hubert_feature_layer"] = None  # half depth (12 of 24)
            elif family != "wav2vec2":
                tapt["hubert_feature_layer"] = 6
            finetune = _FINETUNE_BASE if size == "base" else _FINETUNE_LARGE
            name = f"{size}-{family}"
            recipes[name] = Recipe(name, tapt, dict(finetune), _WARMUP_FRACTION)
    return recipes


RECIPES: dict[str, Recipe] = _recipes()
RECIPE_CHOICES = ("auto", "none", *RECIPES)


@dataclass(frozen=True)
class RecipeChoice:
    """Which recipe applies and why (what ``after-ray config`` prints)."""

    recipe: Recipe | None
    reason: str
    pretrained: bool  # a real checkpoint (a directory or hub id), not a randomly built preset


def _shape_from_name(name: str) -> tuple[str | None, str | None]:
    lowered = name.lower()
    size = next((s for s in ("large", "base", "tiny") if s in lowered), None)
    family = next((f for f in ("hubert", "wavlm") if f in lowered), None)
    if family is None and ("wav2vec2" in lowered or "wav2vec" in lowered or "xls-r" in lowered):
        family = "wav2vec2"
    return size, family


def _shape_from_config_json(path: Path) -> tuple[str | None, str | None]:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    family = data.get("model_type") if data.get("model_type") in FAMILIES else None
    hidden = data.get("hidden_size")
    size = None
    if isinstance(hidden, int):
        size = next((s for limit, s in _SIZE_BY_HIDDEN if hidden <= limit), "large")
    return size, family


def choose_recipe(backbone: Mapping[str, Any]) -> RecipeChoice:
    """The recipe for a ``backbone:`` section (a mapping of the user's keys, defaults implied)."""
    name = str(backbone.get("name_or_path", "tiny"))
    wanted = str(backbone.get("recipe", "auto"))
    family_key = str(backbone.get("family", "auto"))
    preset_size = name.split("-")[0] if name.split("-")[0] in SIZES else None
    pretrained = preset_size is None
    if wanted == "none":
        return RecipeChoice(None, "backbone.recipe: none (the dataclass defaults)", pretrained)
    if wanted != "auto":
        return RecipeChoice(RECIPES.get(wanted), f"backbone.recipe: {wanted}", pretrained)
    if preset_size is not None:
        size, family = preset_size, (name.split("-", 1) + ["wav2vec2"])[1]
        where = f"preset {name!r}"
    elif Path(name).expanduser().is_dir():
        size, family = _shape_from_config_json(Path(name).expanduser())
        where = f"{name}/config.json"
    else:
        size, family = _shape_from_name(name)
        where = f"the name {name!r}"
    if family_key in FAMILIES:
        family = family_key
    if size is None:
        size = "base"
        where += " (size not stated: base assumed; set backbone.recipe to choose)"
    family = family or "wav2vec2"
    key = "tiny" if size == "tiny" else f"{size}-{family}"
    return RecipeChoice(RECIPES[key], f"{key}, from {where}", pretrained)


def apply_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (the user's config mapping) with the chosen recipe's values filled in under the
    keys the user did not set. Returns a new mapping; ``data`` is not changed."""
    backbone = data.get("backbone") if isinstance(data.get("backbone"), dict) else {}
    if str(backbone.get("recipe", "auto")) not in RECIPE_CHOICES:
        return data  # BackboneConfig.validate reports the bad name
    choice = choose_recipe(backbone)
    out = dict(data)
    if choice.recipe is not None:
        for section, values in (("tapt", choice.recipe.tapt), ("finetune", choice.recipe.finetune)):
            user = out.get(section)
            if user is not None and not isinstance(user, dict):
                continue  # the schema reports a section that is not a mapping
            merged = {**values, **(user or {})}
            if section == "tapt" and choice.recipe.tapt_warmup_fraction is not None:
                if "warmup_steps" not in (user or {}):
                    steps = int(merged.get("steps", 0))
                    merged["warmup_steps"] = round(choice.recipe.tapt_warmup_fraction * steps)
            if merged:
                out[section] = merged
    _warn_tiny_values_on_a_checkpoint(out, choice)
    return out


# Values that only the tiny from-scratch model should get, with why, checked on the resolved
# mapping of a pre-trained checkpoint.
_TINY_ONLY = (
    ("tapt", "lr", lambda v: v >= 1.0e-3, "destroys a pre-trained representation (AFTER: 1e-4)"),
    ("tapt", "mask_length", lambda v: v < 5, "is the tiny model's span (wav2vec2/HuBERT: 10)"),
    ("tapt", "num_negatives", lambda v: v < 50, "is the tiny model's value (wav2vec2: 100)"),
    ("finetune", "lr", lambda v: v >= 1.0e-3, "overwrites the pre-trained weights (AFTER: 1e-4)"),
)


def _warn_tiny_values_on_a_checkpoint(data: Mapping[str, Any], choice: RecipeChoice) -> None:
    backbone = data.get("backbone") or {}
    detected = choose_recipe({**backbone, "recipe": "auto"}).recipe
    if not choice.pretrained or detected is None or detected.name == "tiny":
        return
    problems = []
    if choice.recipe is None or choice.recipe.name == "tiny":
        problems.append(
            f"backbone.recipe: {backbone.get('recipe')} gives the tiny from-scratch model's values "
            f"(its checkpoint's recipe is {detected.name})"
        )
    for section, key, bad, why in _TINY_ONLY:
        if key == "num_negatives" and not detected.name.endswith("wav2vec2"):
            continue  # only wav2vec2's contrastive loss draws negatives
        value = (data.get(section) or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and bad(value):
            problems.append(f"{section}.{key}: {value} {why}")
    if problems:
        warnings.warn(
            f"backbone {backbone.get('name_or_path')!r} is a pre-trained checkpoint, but: "
            + "; ".join(problems)
            + ". Remove these keys to get the checkpoint's recipe (see `after-ray config`).",
            RecipeWarning,
            stacklevel=3,
        )
