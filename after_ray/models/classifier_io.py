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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.errors import ConfigError, RunStateError
from after_ray.models.backbones import load_backbone, write_backbone_files
from after_ray.models.classifier import SERClassifier, build_classifier
from after_ray.store.atomic import staged_directory

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
    """Write the classifier to ``out_dir`` atomically (staging directory + rename).

    A failed write (disk full) is a ``RunStateError`` naming ``out_dir``; the previous
    checkpoint there, if any, is left as it was.
    """
    out = Path(out_dir)
    with staged_directory(out, what="the classifier checkpoint") as staging:
        # Inside the one staging directory: a nested staged save would name its own temporary
        # path in an error message instead of out_dir.
        write_backbone_files(model.backbone, staging / "backbone")
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


def _damaged(model_dir: Path, problem: str) -> RunStateError:
    return RunStateError(
        f"classifier checkpoint {str(model_dir)!r} is damaged: {problem}. Delete that directory "
        "and run the stage that wrote it again (for a round's model, `after-ray run` with the "
        "same config retrains that round)"
    )


def read_classifier_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunStateError(
            f"classifier checkpoint {str(model_dir)!r} is unreadable ({exc}); delete it and "
            "re-run the stage that wrote it"
        ) from None
    if not isinstance(meta, dict):
        raise _damaged(Path(model_dir), f"{META} holds a {type(meta).__name__}, not an object")
    return meta


def _head_settings(model_dir: Path, meta: dict[str, Any]) -> tuple[list[str], int, FinetuneConfig]:
    try:
        head = meta["finetune"]
        cfg = FinetuneConfig(
            pooling=head["pooling"], head_dropout=head["head_dropout"], proj_size=head["proj_size"]
        )
        return list(meta["class_names"]), int(meta["n_classes"]), cfg
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(model_dir, f"{META} lacks a valid entry ({exc!r})") from None


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None (reads only its header)."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        # The header lists every tensor's byte range, and safetensors checks that they cover
        # the file exactly: a truncated or overwritten file fails here without reading the data.
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        return f"{path.name} is corrupt or truncated ({exc})"
    return None


def verify_classifier_dir(model_dir: str | os.PathLike) -> None:
    """Raise ``RunStateError`` unless ``model_dir`` is a complete ``save_classifier`` directory.

    Cheap (JSON and safetensors headers only), so a driver can check a checkpoint before handing
    it to workers, where a failure would surface as a Ray error instead of this message.
    """
    model_dir = Path(model_dir)
    _head_settings(model_dir, read_classifier_meta(model_dir))
    backbone = model_dir / "backbone"
    if not (backbone / "config.json").is_file():
        raise _damaged(model_dir, "backbone/config.json is missing")
    problems = [_safetensors_problem(model_dir / WEIGHTS)]
    shards = sorted(backbone.glob("*.safetensors"))
    if not shards:
        problems.append("backbone/ has no safetensors weights")
    problems += [_safetensors_problem(shard) for shard in shards]
    problems = [p for p in problems if p]
    if problems:
        raise _damaged(model_dir, "; ".join(problems))


def load_classifier(model_dir: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a classifier saved by ``save_classifier``: returns (model, class_names).

    A missing, truncated or inconsistent file is a ``RunStateError`` that names the directory
    (nothing in it is ever unpickled).
    """
    model_dir = Path(model_dir)
    verify_classifier_dir(model_dir)
    class_names, n_classes, cfg = _head_settings(model_dir, read_classifier_meta(model_dir))
    try:
        backbone = load_backbone(
            BackboneConfig(name_or_path=str(model_dir / "backbone"), freeze_feature_encoder=False),
            for_pretraining=False,
        )
    except ConfigError as exc:
        # A run's own checkpoint, not the user's configuration: say which directory to delete.
        raise _damaged(model_dir, f"its backbone cannot be loaded ({exc})") from None
    model = build_classifier(backbone, n_classes, cfg)
    try:
        weights = load_file(str(model_dir / WEIGHTS))
    except (SafetensorError, OSError) as exc:  # changed since the check above
        raise _damaged(model_dir, f"{WEIGHTS} is unreadable ({exc})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        detail = " ".join(str(exc).split())[:300]
        raise _damaged(
            model_dir, f"{WEIGHTS} does not match the model {META} describes ({detail})"
        ) from None
    model.to(device).eval()
    return model, class_names
