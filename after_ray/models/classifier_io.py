"""Saving and loading a fine-tuned ``SERClassifier`` as a self-contained directory.

Layout: ``backbone/`` (a Hugging Face directory the backbone can be rebuilt from),
``classifier.safetensors`` (the whole classifier's weights, backbone included) and
``classifier.json`` (classes and head settings). Weights are safetensors only, so loading a
checkpoint from a run directory never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from after_ray.atomic import staged_directory
from after_ray.errors import RunStateError
from after_ray.models.backbones import load_backbone, save_backbone
from after_ray.models.classifier import SERClassifier
from after_ray.models.settings import BackboneConfig
from after_ray.training.finetune import build_classifier
from after_ray.training.finetune_settings import FinetuneConfig

WEIGHTS = "classifier.safetensors"
META = "classifier.json"


def save_classifier(
    model: SERClassifier,
    out_dir: str | os.PathLike,
    *,
    class_names: list[str],
    finetune_cfg: FinetuneConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the classifier to ``out_dir`` atomically (staging directory + rename)."""
    out = Path(out_dir)
    with staged_directory(out) as staging:
        save_backbone(model.backbone, staging / "backbone")
        weights = state_dict if state_dict is not None else model.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, staging / WEIGHTS)
        meta = {
            "class_names": list(class_names),
            "n_classes": model.n_classes,
            "finetune": {
                "pooling": finetune_cfg.pooling,
                "head_dropout": finetune_cfg.head_dropout,
                "proj_size": finetune_cfg.proj_size,
            },
            **(extra or {}),
        }
        (staging / META).write_text(json.dumps(meta, indent=2))
    return out


def read_classifier_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunStateError(
            f"classifier checkpoint {str(model_dir)!r} is unreadable ({exc}); delete it and "
            "re-run the stage that wrote it"
        ) from None


def load_classifier(model_dir: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a classifier saved by ``save_classifier``: returns (model, class_names)."""
    model_dir = Path(model_dir)
    meta = read_classifier_meta(model_dir)
    backbone = load_backbone(
        BackboneConfig(name_or_path=str(model_dir / "backbone"), freeze_feature_encoder=False),
        for_pretraining=False,
    )
    head = meta["finetune"]
    cfg = FinetuneConfig(
        pooling=head["pooling"], head_dropout=head["head_dropout"], proj_size=head["proj_size"]
    )
    model = build_classifier(backbone, int(meta["n_classes"]), cfg)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    model.to(device).eval()
    return model, list(meta["class_names"])
