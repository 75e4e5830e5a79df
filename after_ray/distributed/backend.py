"""The one seam between the pipeline and Ray: probe, TAPT, fine-tune and score for a config.

The pipeline (``pipeline/``) never calls Ray itself. It holds a :class:`RayBackend` built from
the run's config and asks it for the four kinds of distributed work; the backend joins or
starts Ray first (``ensure_ray``, here and nowhere else in the pipeline) and fills in what
every call shares: the resource settings, the audio settings and where Ray Train keeps its
checkpoints. Tests and other executors can stand in for it with the same four methods.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from after_ray.store import layout

if TYPE_CHECKING:
    import pyarrow as pa

    from after_ray.config.finetune import FinetuneConfig
    from after_ray.config.sections import Config
    from after_ray.store.score_cache import PoolScores


@dataclass(frozen=True)
class RayBackend:
    config: Config

    @property
    def storage_path(self) -> str:
        """Ray Train / Tune storage: ``run.storage_path``, else ``<run dir>/ray``."""
        run = self.config.run
        return run.storage_path or str((self.config.run_dir / layout.RAY_STORAGE_DIR).resolve())

    def _ensure_ray(self) -> None:
        from after_ray.distributed.session import ensure_ray

        ensure_ray(self.config.ray)

    def probe(self, rows: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
        """Decode every file once: ``(good rows with durations, quarantined rows)``."""
        from after_ray.distributed.audio_data import probe_audio

        self._ensure_ray()
        return probe_audio(rows, self.config.audio)

    def tapt(
        self, rows: list[dict[str, Any]], *, name: str, out_dir: str | os.PathLike
    ) -> dict[str, Any]:
        """TAPT of the config's backbone on ``rows``; the adapted backbone goes to ``out_dir``."""
        from after_ray.distributed.train import run_tapt

        self._ensure_ray()
        return run_tapt(
            rows=rows,
            tapt=self.config.tapt,
            backbone=self.config.backbone,
            audio=self.config.audio,
            ray_cfg=self.config.ray,
            storage_path=self.storage_path,
            name=name,
            out_dir=out_dir,
        )

    def finetune(
        self,
        train_rows: list[dict[str, Any]],
        val_rows: list[dict[str, Any]],
        class_names: list[str],
        *,
        finetune_cfg: FinetuneConfig,
        backbone_dir: str,
        name: str,
        out_dir: str | os.PathLike,
        warm_start_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Fine-tune a classifier on ``backbone_dir`` (a round's own seed is in ``finetune_cfg``)."""
        from after_ray.distributed.train import run_finetune

        self._ensure_ray()
        return run_finetune(
            train_rows=train_rows,
            val_rows=val_rows,
            class_names=class_names,
            finetune_cfg=finetune_cfg,
            backbone=dataclasses.replace(self.config.backbone, name_or_path=backbone_dir),
            audio=self.config.audio,
            ray_cfg=self.config.ray,
            storage_path=self.storage_path,
            name=name,
            out_dir=out_dir,
            warm_start_dir=warm_start_dir,
        )

    def score(
        self,
        rows: list[dict[str, Any]],
        model_dir: str | os.PathLike,
        *,
        cache_root: str | Path,
        mc_samples: int | None = None,
        seed: int | None = None,
    ) -> PoolScores:
        """Model outputs for ``rows`` (cached under ``cache_root``); MC samples and seed default
        to the config's."""
        from after_ray.distributed.scoring import score_rows

        self._ensure_ray()
        return score_rows(
            rows,
            model_dir,
            audio=self.config.audio,
            ray_cfg=self.config.ray,
            mc_samples=self.config.al.mc_dropout_samples if mc_samples is None else mc_samples,
            seed=self.config.run.seed if seed is None else seed,
            cache_root=cache_root,
        )
