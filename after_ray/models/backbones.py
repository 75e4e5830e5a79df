"""Speech backbones: named presets (random weights) and Hugging Face checkpoints, loaded one way.

``load_backbone(cfg, for_pretraining=...)`` is the only entry point the stages use. It returns

* for wav2vec2 TAPT: ``Wav2Vec2ForPreTraining`` (encoder + quantizer + projection heads);
* otherwise the bare encoder (``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel``). HuBERT and
  WavLM TAPT put our own masked-prediction head on top (``models/pretraining.py``).

Either class loads a directory saved from the other: TAPT saves ``Wav2Vec2ForPreTraining`` and
fine-tuning loads its encoder (the quantizer weights are ignored), and pre-training a plain
encoder checkpoint initialises the quantizer from ``cfg.seed``.

Presets (random weights, deterministic from ``cfg.seed``), one per size and family:

=========  ==========================================================================
tiny       hidden 64, 2 layers, 4 heads, FFN 128, a 5-layer CNN of 32 channels (kernels
           10/8/4/4/4, strides 5/4/4/2/2 = 320 samples = 20 ms per frame at 16 kHz,
           as in every wav2vec2-family model), wav2vec2-base's normalisation (group
           norm after the first conv layer, post-LN transformer), codebooks 2 x 32
           entries. ~0.11M parameters: the BRIEF's measured size, fast enough to
           pre-train on 2 CPU cores.
base       the published wav2vec2-base / hubert-base / wavlm-base shapes (~95M).
large      the published large (LV-60k) shapes: 1024 x 24 layers, layer norm (~317M).
=========  ==========================================================================

The family suffix selects HuBERT or WavLM (``tiny-hubert``, ``base-wavlm``, ...); without one the
preset is wav2vec2 (``tiny-wav2vec2`` is accepted as an alias). A model built from a preset
carries ``after_ray_preset`` in its config, which survives saving and TAPT: that is how
``freeze_feature_encoder: auto`` tells a from-scratch model (never frozen) from a real
pre-trained checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from after_ray.config.backbone import BackboneConfig
from after_ray.errors import ConfigError
from after_ray.store.atomic import staged_directory

FAMILIES = ("wav2vec2", "hubert", "wavlm")
# Config attribute that marks a model built from a preset (kept through save/load and TAPT).
PRESET_MARKER = "after_ray_preset"
DEFAULT_SAMPLING_RATE = 16_000

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "wav2vec2": Wav2Vec2Config,
    "hubert": HubertConfig,
    "wavlm": WavLMConfig,
}
_ENCODER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "wav2vec2": Wav2Vec2Model,
    "hubert": HubertModel,
    "wavlm": WavLMModel,
}

# Shapes shared by every family at one size. The quantizer fields only matter to wav2vec2.
_SIZE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "conv_dim": (32, 32, 32, 32, 32),
        "conv_kernel": (10, 8, 4, 4, 4),
        "conv_stride": (5, 4, 4, 2, 2),
        # wav2vec2-base's normalisation: group norm (per channel, over time) after the first
        # conv layer only, post-LN transformer. Measured on synthetic audio (8 x 1-2 s, 100
        # TAPT steps): contrastive loss 2.53 -> 1.08, accuracy 0.61, whereas per-frame layer norm
        # in every conv layer ("layer", wav2vec2-large's choice) only reached 2.22 / 0.19: it
        # rescales every frame to unit norm, which erases frame energy (a key emotion cue) and
        # blows silence up to noise. The price: group-norm statistics include zero padding, so
        # a frame's features depend a little on how much padding its batch has (batch by
        # length when embedding; the attention mask still keeps padding out of attention).
        "conv_bias": False,
        "feat_extract_norm": "group",
        "do_stable_layer_norm": False,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        # Dropping one of two layers at random is too harsh, and layerdrop breaks plain DDP.
        "layerdrop": 0.0,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "feat_proj_dropout": 0.0,
        # Codebooks sized for 64 dims: 2 groups x 32 entries of 16 dims, projected to 32.
        "num_codevector_groups": 2,
        "num_codevectors_per_group": 32,
        "codevector_dim": 32,
        "proj_codevector_dim": 32,
        "num_negatives": 10,
    },
    # transformers' config defaults are the published base shapes of all three families.
    "base": {},
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
        "codevector_dim": 768,
        "proj_codevector_dim": 768,
    },
}
_QUANTIZER_KEYS = (
    "num_codevector_groups",
    "num_codevectors_per_group",
    "codevector_dim",
    "proj_codevector_dim",
    "num_negatives",
)


@dataclass(frozen=True)
class Preset:
    name: str
    size: str
    family: str


def _build_presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for size in _SIZE_SHAPES:
        presets[size] = Preset(size, size, "wav2vec2")
        for family in FAMILIES:
            name = f"{size}-{family}"
            presets[name] = Preset(name, size, family)
    return presets


PRESETS: dict[str, Preset] = _build_presets()
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset_config(name: str, family: str = "auto") -> PretrainedConfig:
    """The (untrained) model config of preset ``name``, optionally forced to another family."""
    preset = _resolve_preset(name, family)
    shape = dict(_SIZE_SHAPES[preset.size])
    if preset.family != "wav2vec2":
        for key in _QUANTIZER_KEYS:
            shape.pop(key, None)
    config = _CONFIG_CLASSES[preset.family](**shape)
    setattr(config, PRESET_MARKER, preset.name)
    return config


def _resolve_preset(name: str, family: str) -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        raise ConfigError(_unknown_name_message(name))
    if family not in ("auto", preset.family):
        if name != preset.size:  # the name already says a family, and it is a different one
            raise ConfigError(
                f"backbone.family: {family!r} contradicts preset {name!r} (a {preset.family} "
                f"model); use preset '{preset.size}-{family}' or family 'auto'"
            )
        preset = PRESETS[f"{preset.size}-{family}"]
    return preset


def _unknown_name_message(name: str) -> str:
    return (
        f"backbone.name_or_path: {name!r} is neither a preset nor an existing checkpoint "
        f"directory. Presets: {', '.join(PRESET_NAMES)}. Otherwise give a local directory "
        "containing config.json, or a Hugging Face hub id of the form 'org/name'"
    )


def _looks_like_hub_id(name: str) -> bool:
    # "org/name": exactly one slash, not a relative or absolute path.
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _family_of(config: PretrainedConfig, where: str) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(
            f"backbone.name_or_path: {where!r} is a {family!r} model; supported families are "
            f"{', '.join(FAMILIES)}"
        )
    return family


def model_class(family: str, *, for_pretraining: bool) -> type[PreTrainedModel]:
    """The class ``load_backbone`` returns for a family."""
    if family not in FAMILIES:
        raise ConfigError(f"backbone.family: unknown family {family!r}; choose {FAMILIES}")
    if family == "wav2vec2" and for_pretraining:
        return Wav2Vec2ForPreTraining
    return _ENCODER_CLASSES[family]


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS


def load_backbone(cfg: BackboneConfig, *, for_pretraining: bool) -> PreTrainedModel:
    """Build a preset or load a checkpoint (local directory or hub id), per ``cfg``.

    Never downloads by itself: a hub id goes to ``from_pretrained`` as it is, so it works only
    where the hub (or its local cache) can be reached. Randomly initialised weights (a preset's,
    or heads the checkpoint lacks) are drawn from ``cfg.seed`` without touching the global RNG.
    """
    name = cfg.name_or_path.strip() if cfg.name_or_path else ""
    if not name:
        raise ConfigError(_unknown_name_message(name))
    if is_preset(name):
        config = preset_config(name, cfg.family)
        _apply_overrides(config, cfg, for_pretraining)
        cls = model_class(config.model_type, for_pretraining=for_pretraining)
        with _seeded(cfg.seed):
            model = cls(config)
    else:
        model = _load_checkpoint(name, cfg, for_pretraining)
    if resolve_freeze_feature_encoder(cfg.freeze_feature_encoder, model.config, for_pretraining):
        freeze_feature_encoder(model)
    return model


def _load_checkpoint(name: str, cfg: BackboneConfig, for_pretraining: bool) -> PreTrainedModel:
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"backbone.name_or_path: directory {name!r} is not a checkpoint (no config.json); "
                "point it at a directory written by save_pretrained, or use a preset: "
                f"{', '.join(PRESET_NAMES)}"
            )
        source = str(local)
        # A local directory is loaded from safetensors only: never fall back to a pickle.
        use_safetensors: bool | None = True
    elif _looks_like_hub_id(name):
        source = name
        use_safetensors = None  # transformers prefers safetensors on the hub when present
    else:
        raise ConfigError(_unknown_name_message(name))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"backbone.name_or_path: could not read the config of {name!r} ({exc}). A hub id needs "
            "network access or a local hub cache; otherwise use a local directory or a preset"
        ) from None
    family = _family_of(config, name)
    if cfg.family not in ("auto", family):
        raise ConfigError(
            f"backbone.family: {cfg.family!r} but {name!r} is a {family} checkpoint "
            "(set backbone.family to 'auto' or to the checkpoint's family)"
        )
    if local.is_dir():
        _check_local_weights(local, name, config, family)
    _apply_overrides(config, cfg, for_pretraining)
    cls = model_class(family, for_pretraining=for_pretraining)
    try:
        with _seeded(cfg.seed):
            return cls.from_pretrained(source, config=config, use_safetensors=use_safetensors)
    except SafetensorError as exc:
        # Rust's error type, not an OSError: a truncated or overwritten weights file.
        raise ConfigError(
            f"backbone.name_or_path: the safetensors weights in {name!r} are corrupt or truncated "
            f"({exc}); copy or download the checkpoint again"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"backbone.name_or_path: could not load the weights of {name!r} ({exc})"
        ) from None


# Weight files that are pickles (torch.save / pickle): loading them could run code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin.index.json")
_SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
_SAFE_INDEX = "model.safetensors.index.json"


def _check_local_weights(local: Path, name: str, config: PretrainedConfig, family: str) -> None:
    """Refuse a local checkpoint unless everything transformers would load is safetensors.

    Checked before ``from_pretrained`` so that no pickle in the directory is ever opened (not
    even by ``torch.load(weights_only=True)``'s restricted unpickler), and so that the user gets
    a ConfigError saying how to convert instead of an UnpicklingError from deep inside
    transformers.
    """
    # config.json may name the weights file itself, and transformers then loads it whatever
    # use_safetensors says (it lets "adapter_model.bin", a pickle, through).
    explicit = getattr(config, "transformers_weights", None)
    if explicit is not None and not str(explicit).endswith(_SAFE_SUFFIXES):
        raise ConfigError(
            f"backbone.name_or_path: config.json of {name!r} names {explicit!r} as its weights "
            "file (transformers_weights), which is not safetensors; after-ray loads safetensors "
            "only: remove that key and give the directory a model.safetensors"
        )
    if (local / _SAFE_INDEX).is_file() and not (local / "model.safetensors").is_file():
        # A sharded checkpoint: every shard its index names is loaded by file name.
        try:
            shards = set(json.loads((local / _SAFE_INDEX).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"backbone.name_or_path: {str(local / _SAFE_INDEX)!r} is unreadable ({exc!r}); "
                "copy or download the checkpoint again"
            ) from None
        unsafe = sorted(str(s) for s in shards if not str(s).endswith(".safetensors"))
        if unsafe:
            raise ConfigError(
                f"backbone.name_or_path: {str(local / _SAFE_INDEX)!r} points at weight files "
                f"that are not safetensors ({', '.join(unsafe[:3])}); after-ray loads "
                "safetensors only"
            )
    if any(local.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name for p in local.iterdir() if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES)
    )
    if not pickles:
        raise ConfigError(
            f"backbone.name_or_path: directory {name!r} has a config.json but no weights "
            "(model.safetensors); point it at a complete directory written by save_pretrained"
        )
    converter = _architecture_of(config, family)
    where = json.dumps(str(local.resolve()))  # a Python string literal for any path
    code = (
        f"from transformers import {converter}; {converter}.from_pretrained({where}, "
        f"use_safetensors=False).save_pretrained({where})"
    )
    raise ConfigError(
        f"backbone.name_or_path: {name!r} holds its weights only as a pickle "
        f"({', '.join(pickles)}), and after-ray never unpickles weights (a pickle can run "
        "arbitrary code when loaded). If you trust where the checkpoint came from, convert it "
        "to safetensors once (this loads the pickle with torch.load(weights_only=True)):\n"
        f"    python -c {shlex.quote(code)}\n"
        "then run the same command again; or use a checkpoint that ships model.safetensors"
    )


def _architecture_of(config: PretrainedConfig, family: str) -> str:
    """The transformers class that loads and saves every weight of the checkpoint."""
    # The checkpoint's own architecture keeps its heads (quantizer, CTC head) in the conversion.
    # Only a name that transformers itself exports is used: config.json is not trusted.
    prefixes = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}
    for arch in getattr(config, "architectures", None) or []:
        if (
            isinstance(arch, str)
            and arch.isidentifier()
            and arch.startswith(prefixes[family])
            and isinstance(getattr(transformers, arch, None), type)
        ):
            return arch
    return model_class(family, for_pretraining=True).__name__


def _apply_overrides(config: PretrainedConfig, cfg: BackboneConfig, for_pretraining: bool) -> None:
    for key, value in cfg.dropout_overrides().items():
        setattr(config, key, value)
    if for_pretraining:
        # Pre-training masks frames with the model's learned mask embedding: it exists only when
        # a time-mask probability is set, and apply_spec_augment=False would skip our mask.
        if config.mask_time_prob <= 0 and config.mask_feature_prob <= 0:
            config.mask_time_prob = 0.05
        config.apply_spec_augment = True


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def preset_of(config: PretrainedConfig) -> str | None:
    """The preset a model was built from (kept through save/load), or None for a checkpoint."""
    return getattr(config, PRESET_MARKER, None)


def resolve_freeze_feature_encoder(
    setting: bool | str, config: PretrainedConfig, for_pretraining: bool
) -> bool:
    """Whether to freeze the CNN encoder: ``auto`` freezes real checkpoints when fine-tuning only."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ConfigError(
            f"backbone.freeze_feature_encoder: must be true, false or 'auto', got {setting!r}"
        )
    return not for_pretraining and preset_of(config) is None


def freeze_feature_encoder(model: torch.nn.Module) -> None:
    """Stop gradients to the CNN feature encoder (transformers' own switch, any family)."""
    encoder_of(model).feature_extractor._freeze_parameters()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def encoder_of(model: torch.nn.Module) -> PreTrainedModel:
    """The bare encoder (``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel``) of any backbone."""
    model = unwrap(model)
    return model.wav2vec2 if isinstance(model, Wav2Vec2ForPreTraining) else model


def frames_for_samples(
    model_or_config: torch.nn.Module | PretrainedConfig, n_samples: int | torch.Tensor
) -> int | torch.Tensor:
    """Encoder frames produced for ``n_samples`` waveform samples (an int or a tensor of them).

    Uses the model class's own ``_get_feat_extract_output_lengths``, so it follows whatever the
    config says about kernels, strides and adapters. Waveforms shorter than the CNN's receptive
    field (825 samples for the tiny preset, 400 for base) give 0 frames.
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = unwrap(model_or_config)
        config = model.config
    else:
        config = model_or_config
        model = None
    family = _family_of(config, getattr(config, "_name_or_path", "") or "model config")
    owner = model if model is not None else SimpleNamespace(config=config)
    method = _ENCODER_CLASSES[family]._get_feat_extract_output_lengths
    if isinstance(n_samples, torch.Tensor):
        return method(owner, n_samples).to(torch.long).clamp(min=0)
    frames = method(owner, torch.tensor(int(n_samples)))
    return max(int(frames), 0)


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def preset_parameter_count(name: str, *, for_pretraining: bool = True) -> int:
    """Parameters of a preset, counted without allocating its weights (meta device)."""
    config = preset_config(name)
    cls = model_class(config.model_type, for_pretraining=for_pretraining)
    with torch.device("meta"):
        model = cls(config)
    return count_parameters(model)


def feature_extractor_for(sampling_rate: int = DEFAULT_SAMPLING_RATE) -> Wav2Vec2FeatureExtractor:
    """The feature extractor matching our audio pipeline: per-utterance normalisation and an
    attention mask, so Hugging Face pipelines feed a model what it was trained on."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=sampling_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def save_backbone(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
    what: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory: config, safetensors weights and a
    ``Wav2Vec2FeatureExtractor`` (sampling rate, per-utterance normalisation, attention mask).

    The directory is written next to ``out_dir`` first and renamed into place, so a crash never
    leaves a half-written checkpoint where a good one was; a failed write (disk full) is a
    ``RunStateError`` whose message calls the directory ``what``.
    """
    out = Path(out_dir)
    with staged_directory(out, what=what) as staging:
        write_backbone_files(model, staging, sampling_rate=sampling_rate)
    return out


def write_backbone_files(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
) -> None:
    """``save_backbone``'s files, written straight into ``directory`` (not atomic on its own:
    for a caller that stages the directory around it)."""
    unwrap(model).save_pretrained(str(directory))
    feature_extractor_for(sampling_rate).save_pretrained(str(directory))
