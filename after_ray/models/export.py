"""Export a fine-tuned ``SERClassifier`` as a standard Hugging Face audio-classification model.

The directory holds ``config.json`` (with ``id2label`` / ``label2id``), ``model.safetensors`` and
``preprocessor_config.json`` (a ``Wav2Vec2FeatureExtractor``), so that
``transformers.pipeline("audio-classification", model=out_dir)`` or
``AutoModelForAudioClassification.from_pretrained(out_dir)`` works without after-ray.

Mapping. ``*ForSequenceClassification`` (wav2vec2 / HuBERT / WavLM) computes ``classifier(mean
over valid frames of projector(h_t))``. Both layers are linear and the mean is a weighted sum
whose weights add to 1, so ``mean(projector(h)) = projector(mean(h))`` and our head (mean pool ->
optional projection -> dropout -> linear) maps exactly: with our projection, ``projector`` =
ours; without, ``projector`` = identity (``classifier_proj_size = hidden_size``). Dropout is
inactive at inference. Attentive pooling has no counterpart there, so it cannot be exported.

Differences to know: the feature extractor normalises each utterance to zero mean / unit variance
(``(x - mean) / sqrt(var + 1e-7)``), as our audio pipeline does; the pipeline decodes a file path
with ffmpeg (pass ``{"raw": array, "sampling_rate": sr}`` where ffmpeg is missing). With a
GroupNorm CNN (wav2vec2-base) the Hugging Face model normalises its first CNN layer over padded
samples too, so batched inference with padding differs slightly from ours; one utterance at a
time (what the pipeline does) is identical.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    HubertForSequenceClassification,
    PreTrainedModel,
    Wav2Vec2ForSequenceClassification,
    WavLMForSequenceClassification,
)

from after_ray.errors import ConfigError
from after_ray.models.backbones import feature_extractor_for
from after_ray.models.classifier import SERClassifier

_CLASSES: dict[str, tuple[type[PreTrainedModel], str]] = {
    "wav2vec2": (Wav2Vec2ForSequenceClassification, "wav2vec2"),
    "hubert": (HubertForSequenceClassification, "hubert"),
    "wavlm": (WavLMForSequenceClassification, "wavlm"),
}


def to_hf_model(model: SERClassifier, class_names: Sequence[str]) -> PreTrainedModel:
    """The equivalent ``*ForSequenceClassification`` model, weights copied (eval mode)."""
    if model.pooling != "mean":
        raise ConfigError(
            f"cannot export a classifier with {model.pooling!r} pooling: Hugging Face's "
            "sequence-classification head only mean-pools; train with finetune.pooling: mean "
            "to export, or keep the after-ray checkpoint"
        )
    names = [str(name) for name in class_names]
    if len(names) != model.n_classes or len(set(names)) != len(names):
        raise ConfigError(f"need {model.n_classes} distinct class names for export, got {names}")
    backbone = model.backbone
    model_type = backbone.config.model_type
    if model_type not in _CLASSES:
        raise ConfigError(f"no Hugging Face export for backbone type {model_type!r}")
    hf_class, prefix = _CLASSES[model_type]

    config = copy.deepcopy(backbone.config)
    hidden = int(config.hidden_size)
    proj_size = model.projector.out_features if model.projector is not None else hidden
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in enumerate(names)}
    config.classifier_proj_size = proj_size
    config.use_weighted_layer_sum = False
    config.architectures = [hf_class.__name__]
    has_mask_embed = getattr(backbone, "masked_spec_embed", None) is not None
    if not has_mask_embed:
        # Otherwise the HF model would create a masked_spec_embed that we have no weights for.
        config.mask_time_prob = 0.0
        config.mask_feature_prob = 0.0

    hf_model = hf_class(config)
    state = {f"{prefix}.{key}": value for key, value in backbone.state_dict().items()}
    if model.projector is not None:
        state["projector.weight"] = model.projector.weight.detach().clone()
        state["projector.bias"] = model.projector.bias.detach().clone()
    else:
        state["projector.weight"] = torch.eye(hidden)
        state["projector.bias"] = torch.zeros(hidden)
    state["classifier.weight"] = model.classifier.weight.detach().clone()
    state["classifier.bias"] = model.classifier.bias.detach().clone()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"export weight mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    return hf_model.eval()


def export_hf(
    model: SERClassifier,
    class_names: Sequence[str],
    out_dir: str | Path,
    sampling_rate: int = 16000,
) -> Path:
    """Write a Hugging Face audio-classification directory (safetensors weights); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = to_hf_model(model, class_names)
    hf_model.save_pretrained(out, safe_serialization=True)
    feature_extractor_for(sampling_rate).save_pretrained(out)
    (out / "after_ray_export.json").write_text(
        json.dumps(
            {
                "class_names": list(map(str, class_names)),
                "sampling_rate": sampling_rate,
                "pooling": model.pooling,
                "note": "exported by after-ray; inputs are normalised per utterance",
            },
            indent=2,
        )
    )
    return out
