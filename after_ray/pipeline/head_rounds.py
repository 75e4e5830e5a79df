"""AL rounds with a frozen backbone (``finetune.mode: head``): one feature pass, then rounds that
train and apply only the head, in the driver.

Why: with full fine-tuning every round re-reads the labeled audio for every epoch, and scoring
the pool and the test split starts a Ray Data actor pool each time; on the demo those fixed
costs made the AL loop as expensive as training on everything. Here the audio is read once:

1. ``FeatureSpace.build`` scores every manifest row (pool, validation, test) with the TAPT
   backbone and a ``layer_stats`` (or ``mean``) head whose standardisation is the identity: the
   pooled features, through the same Ray Data actor pool and score cache as any scoring
   (streamed, cached under ``<output_dir>/_features/<key>/``, shared by every arm and seed that
   uses the same backbone and audio settings). Then the pool's mean/std fixes the
   standardisation for the whole run.
2. Each round fits the head on the labeled items' cached features (``training/head.py``), puts
   it into an ``SERClassifier`` around the same backbone and saves that as the round's model,
   so ``after-ray score`` on it from audio gives the same outputs.
3. Test evaluation and pool scoring apply the head to cached features: milliseconds, no actors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.config.backbone import BackboneConfig
from after_ray.config.sections import Config
from after_ray.store import layout
from after_ray.store.atomic import atomic_write_json
from after_ray.store.score_cache import PoolScores

FEATURE_SEED = 0  # the feature model's random head is never used: one seed for every run


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


SPEAKER_STD_FLOOR = 1e-6


def speaker_standardise(features: np.ndarray, speakers: list[str | None]) -> np.ndarray:
    """Each feature z-scored over each speaker's rows (mean 0, std 1 per speaker; a speaker
    with one row is only centred; rows without a speaker are left as they are)."""
    out = np.array(features, dtype=np.float32, copy=True)
    groups: dict[str, list[int]] = {}
    for i, speaker in enumerate(speakers):
        if speaker:
            groups.setdefault(str(speaker), []).append(i)
    for rows in groups.values():
        block = out[rows].astype(np.float64)
        centred = block - block.mean(axis=0)
        if len(rows) > 1:
            centred /= np.maximum(block.std(axis=0), SPEAKER_STD_FLOOR)
        out[rows] = centred.astype(np.float32)
    return out


@dataclass
class FeatureSpace:
    """Raw pooled features of every scored row, and the pool's standardisation."""

    scores: PoolScores  # embedding = raw pooled features, rows in utt_id order
    shift: np.ndarray
    scale: np.ndarray
    model_dir: Path
    # The last round model trained or loaded, with the directory it is saved in: a round's test
    # evaluation and the next round's pool scoring apply that same model, and reloading it from
    # its checkpoint each time was 0.5 s of a 3.4 s AL loop on the demo. A resumed run loads it
    # from disk once (safetensors round-trip float32 exactly, so the outputs are the same).
    _model: tuple[Path, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        config: Config,
        state,
        backbone_dir: str,
        rows: list[dict],
        pool_ids: list[str],
        class_names: list[str],
    ) -> FeatureSpace:
        from after_ray.distributed.backend import RayBackend
        from after_ray.faults import failpoint
        from after_ray.training.head import pool_standardisation

        key = _key(
            {
                "backbone_dir": backbone_dir,
                "backbone": config.backbone.identity(),
                "audio": dataclasses.asdict(config.audio),
                "pooling": config.finetune.pooling,
            }
        )
        root = Path(config.run.output_dir).resolve() / "_features" / key
        model_dir = root / "model"
        _ensure_feature_model(config, backbone_dir, class_names, model_dir)
        failpoint("stage:features")
        with state.timed("features"):
            scores = RayBackend(config).score(
                rows,
                model_dir,
                cache_root=root / layout.SCORES_DIR,
                mc_samples=0,
                seed=FEATURE_SEED,
            )
        if config.finetune.speaker_norm:
            speakers = {r["utt_id"]: r.get("speaker") for r in rows}
            embedding = speaker_standardise(
                scores.embedding, [speakers.get(u) for u in scores.utt_ids.tolist()]
            )
            scores = dataclasses.replace(scores, embedding=embedding)
        scored = set(scores.utt_ids.tolist())
        pool = scores.take([u for u in pool_ids if u in scored])
        shift, scale = pool_standardisation(pool.embedding)
        return cls(scores=scores, shift=shift, scale=scale, model_dir=model_dir)

    @functools.cached_property
    def utt_ids(self) -> set[str]:
        # Cached: membership is asked once per pool row per round (a set per call cost 2 s of a
        # 6 s AL loop on the demo).
        return set(self.scores.utt_ids.tolist())

    def raw(self, utt_ids: list[str]) -> np.ndarray:
        return self.scores.take(utt_ids).embedding

    def standardised(self, utt_ids: list[str]) -> np.ndarray:
        return (self.raw(utt_ids) - self.shift) / self.scale

    def cold_start_scores(self, utt_ids: list[str]) -> PoolScores:
        """What a cold start reads before any model exists: the standardised features."""
        embedding = self.standardised(utt_ids).astype(np.float32)
        n_classes = self.scores.probs.shape[1]
        return PoolScores(
            utt_ids=np.asarray(utt_ids, dtype=object),
            probs=np.full((len(utt_ids), n_classes), 1.0 / n_classes, dtype=np.float32),
            embedding=embedding,
            penultimate=embedding,
            mc_probs=np.zeros((len(utt_ids), 0, n_classes), dtype=np.float32),
        )

    def score(self, model_dir: str | Path, utt_ids: list[str], *, mc_samples: int, seed: int):
        """A round model's outputs on ``utt_ids`` from the cached features."""
        from after_ray.training.head import head_outputs

        out = head_outputs(
            self._model_in(model_dir), self.raw(utt_ids), mc_samples=mc_samples, seed=seed
        )
        return PoolScores(utt_ids=np.asarray(utt_ids, dtype=object), **out)

    def keep_model(self, model_dir: str | Path, model) -> None:
        """Remember ``model``, just saved to ``model_dir``, for the scoring that follows."""
        self._model = (Path(model_dir).resolve(), model)

    def _model_in(self, model_dir: str | Path):
        from after_ray.models.classifier_io import load_classifier

        key = Path(model_dir).resolve()
        if self._model is None or self._model[0] != key:
            self._model = (key, load_classifier(key)[0])
        return self._model[1]


def _ensure_feature_model(config: Config, backbone_dir: str, class_names, model_dir: Path) -> None:
    """The backbone plus an identity-standardised head: its pooled output is the raw feature."""
    from after_ray.errors import RunStateError
    from after_ray.models.classifier_io import save_classifier, verify_classifier_dir

    if (model_dir / "classifier.json").is_file():
        try:
            verify_classifier_dir(model_dir)
            return
        except RunStateError as exc:
            print(f"warning: {exc}. Rebuilding it.", flush=True)
    model = _round_model(config, backbone_dir, class_names, FEATURE_SEED)
    save_classifier(model, model_dir, class_names=class_names, finetune_cfg=config.finetune)


_BACKBONES: dict[str, Any] = {}


def _loaded_backbone(backbone_cfg: BackboneConfig):
    """The frozen backbone, loaded once per process: every round's classifier wraps it."""
    from after_ray.models.backbones import load_backbone

    key = json.dumps(dataclasses.asdict(backbone_cfg), sort_keys=True, default=str)
    if key not in _BACKBONES:
        _BACKBONES.clear()  # one backbone at a time: a base model is ~0.4 GB
        _BACKBONES[key] = load_backbone(backbone_cfg, for_pretraining=False)
    return _BACKBONES[key]


def _round_model(config: Config, backbone_dir: str, class_names, seed: int):
    import torch

    from after_ray.models.classifier import build_classifier

    backbone_cfg = dataclasses.replace(config.backbone, name_or_path=backbone_dir)
    ft_cfg = dataclasses.replace(config.finetune, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # No copy: in head mode the backbone is never trained (the head fits on cached
        # features), so every round's classifier can wrap the one loaded module; a deep copy per
        # round was 0.3 s of a 3.4 s AL loop on the demo.
        model = build_classifier(_loaded_backbone(backbone_cfg), len(class_names), ft_cfg)
    return model.eval()


def train_round_head(
    config: Config,
    features: FeatureSpace,
    *,
    backbone_dir: str,
    train_rows: list[dict],
    val_rows: list[dict],
    class_names: list[str],
    seed: int,
    out_dir: Path,
) -> dict[str, Any]:
    """Fit the head on ``train_rows``' cached features, save the round model to ``out_dir``;
    returns the summary the runner stores (best L2, validation report, sizes)."""
    import torch

    from after_ray.distributed.audio_data import label_targets
    from after_ray.models.classifier_io import save_classifier
    from after_ray.training.finetune import batch_targets
    from after_ray.training.head import fit_head

    index = {c: i for i, c in enumerate(class_names)}
    train_ids = [r["utt_id"] for r in train_rows]
    label_index, soft = label_targets(
        [r.get("label") for r in train_rows], [r.get("votes") for r in train_rows], index
    )
    targets, labeled = batch_targets(
        {"utt_id": train_ids, "label_index": label_index, "soft_target": soft},
        len(class_names),
        config.finetune.label_aggregation,
        seed=seed,
    )
    keep = labeled.numpy()
    val_ids = [r["utt_id"] for r in val_rows if r["utt_id"] in features.utt_ids]
    val_labels = np.asarray(
        [index[r["label"]] for r in val_rows if r["utt_id"] in features.utt_ids]
    )
    model = _round_model(config, backbone_dir, class_names, seed)
    if model.pooling == "layer_stats":
        model.set_pooled_standardisation(
            torch.as_tensor(features.shift), torch.as_tensor(features.scale)
        )
    fit = fit_head(
        model,
        features.raw([u for u, k in zip(train_ids, keep, strict=True) if k]),
        targets.numpy()[keep],
        features.raw(val_ids),
        val_labels,
        class_names=class_names,
        l2_grid=tuple(config.finetune.head_l2_grid),
        class_weighted=config.finetune.class_weighted,
        seed=seed,
    )
    save_classifier(model, out_dir, class_names=class_names, finetune_cfg=config.finetune)
    features.keep_model(out_dir, model)
    summary = {
        "mode": "head",
        "n_train": int(keep.sum()),
        "best_l2": fit.l2,
        "val_ua_by_l2": {str(k): v for k, v in fit.val_ua_by_l2.items()},
        "best_val_report": fit.val_report,
        "train_loss": fit.train_loss,
    }
    atomic_write_json(out_dir.parent / "finetune_summary.json", summary)
    return summary
