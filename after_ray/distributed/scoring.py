"""Scoring a pool with a classifier checkpoint on a Ray Data actor pool, with a score cache.

For every utterance: class probabilities, the pooled embedding, the penultimate features (what
BADGE needs: gradient embeddings are never materialised) and T Monte-Carlo-dropout probability
samples (BALD). Long utterances are scored in chunks and averaged per ``utt_id``.

Results go to a cache directory ``<cache_root>/<key>/`` (layout and memory-bounded reading in
``after_ray.store.score_cache``) where the key hashes the checkpoint's weights, the MC settings and the
audio settings, so scoring the same checkpoint again (a resumed run, a second strategy over the
same model) is read from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from after_ray import faults
from after_ray.config.audio import AudioConfig
from after_ray.faults import failpoint
from after_ray.store.score_cache import ARRAY_KEYS, PoolScores, read_scores, write_scores

log = logging.getLogger(__name__)


class ScoringActor:
    """``map_batches`` callable class: loads the checkpoint once per actor.

    An actor that dies mid-scoring (a lost node, the OOM killer, the ``score_actor_batch``
    failpoint) is restarted by Ray and its unfinished batches are retried on it (see
    ``score_rows``); the restart runs ``__init__`` again, which reloads the checkpoint.
    ``failpoints``: the driver's ``faults.snapshot()`` (actors do not inherit its environment).
    """

    def __init__(
        self,
        model_dir: str,
        mc_samples: int,
        seed: int,
        torch_threads: int = 1,
        failpoints: dict[str, str] | None = None,
    ):
        import torch

        from after_ray.models.classifier_io import load_classifier

        faults.install(failpoints)

        torch.set_num_threads(max(1, torch_threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = load_classifier(model_dir, device=device)
        self.mc_samples = mc_samples
        self.seed = seed
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from after_ray.distributed.audio_data import PadCollate
        from after_ray.training.scoring import score_batch

        failpoint("score_actor_batch")
        padded = PadCollate()(batch)
        out = score_batch(
            self.model, padded, mc_samples=self.mc_samples, seed=self.seed, device=self.device
        )
        n = len(out["utt_id"])
        return {
            "utt_id": np.asarray(out["utt_id"], dtype=object),
            "chunk_index": np.asarray(batch["chunk_index"], dtype=np.int64),
            "length": np.asarray(batch["length"], dtype=np.int64),
            # Flattened so every block has the same simple schema.
            **{key: out[key].reshape(n, -1).astype(np.float32) for key in ARRAY_KEYS},
            "mc_shape": np.tile(np.asarray(out["mc_probs"].shape[1:], dtype=np.int64), (n, 1)),
        }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(model_dir: str | os.PathLike, mc_samples: int, seed: int, audio: AudioConfig) -> str:
    from after_ray.models.classifier_io import WEIGHTS

    payload = {
        "weights": _file_digest(Path(model_dir) / WEIGHTS),
        "mc_samples": mc_samples,
        "seed": seed,
        "audio": asdict(audio),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _score_on_actor_pool(rows, model_dir, audio: AudioConfig, ray_cfg, mc_samples: int, seed: int):
    """The scored chunks, as lists of batch arrays, from a Ray Data actor pool."""
    from ray.data import ActorPoolStrategy

    from after_ray.distributed.audio_data import audio_dataset, in_order

    ds = audio_dataset(
        [{"utt_id": r["utt_id"], "path": r["path"]} for r in rows], audio, mode="score"
    )
    scored = ds.map_batches(
        ScoringActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "mc_samples": mc_samples,
            "seed": seed,
            "torch_threads": max(1, ray_cfg.cpus_per_worker),
            "failpoints": faults.snapshot(),
        },
        batch_size=ray_cfg.scoring_batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=ray_cfg.scoring_actors),
        num_gpus=1 if ray_cfg.use_gpu else 0,
        # One CPU reserved per actor (torch still uses cpus_per_worker threads): reserving all of
        # them would leave none for the decode tasks feeding the actors, and the stream would hang.
        num_cpus=1,
        # A lost actor (node lost, OOM killer) is restarted and its batches are retried on it:
        # Ray 2.60 gives actor-pool map operators max_restarts=-1 and max_task_retries=-1 by
        # default (ActorPoolMapOperator._apply_default_remote_args: given to the pool's actors,
        # outside the args that operator fusion compares).
        # Not passed here on purpose: remote args that differ from decode_batch's stop Ray Data
        # from fusing the decoding into these actors, and the decode tasks then need CPUs beside
        # the actors (a sweep deadlocks; see sweep.trial_peak). tests/faults/test_worker_failures.py
        # checks both: the fused plan, and a killed actor's batches retried.
    )
    # The same batches on every run: reproducible MC-dropout draws.
    in_order(scored)
    # Whole batch arrays, concatenated once: no per-row Python objects for a big pool.
    parts: dict[str, list] = {k: [] for k in ("utt_id", "length", *ARRAY_KEYS, "mc_shape")}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for key in parts:
            parts[key].append(np.asarray(batch[key]))
    return parts


def in_process(ray_cfg, n_rows: int) -> bool:
    """Score in the driver: training runs there too (num_workers 0), no GPU is asked for, and
    the set is small enough that an actor pool's start-up would cost more than the work."""
    return (
        ray_cfg.num_workers == 0
        and not ray_cfg.use_gpu
        and n_rows <= ray_cfg.in_process_scoring_max_rows
    )


def _score_in_process(rows, model_dir, audio: AudioConfig, ray_cfg, mc_samples: int, seed: int):
    """The same chunks and actor code as the actor pool, run in this process: rows decoded in
    order and cut into batches of ``ray.scoring_batch_size`` chunks. Probabilities and
    embeddings equal the pool's; MC-dropout samples are other (reproducible) draws of the same
    distribution, since a draw depends on the row's place in its batch and Ray Data cuts its
    batches along its blocks."""
    import torch

    from after_ray.distributed.audio_data import decode_batch

    threads = torch.get_num_threads()
    try:
        actor = ScoringActor(str(model_dir), mc_samples, seed,
                             torch_threads=max(1, ray_cfg.cpus_per_worker))  # fmt: skip
        decoded = decode_batch(
            {
                "utt_id": np.asarray([r["utt_id"] for r in rows], dtype=object),
                "path": np.asarray([r["path"] for r in rows], dtype=object),
            },
            cfg=audio,
            mode="score",
            seed=0,
            epoch=None,
            label_to_index=None,
            soft_targets=False,
        )
        columns = {
            "utt_id": np.asarray(decoded.column("utt_id").to_pylist(), dtype=object),
            "audio": [np.asarray(a, dtype=np.float32) for a in decoded.column("audio").to_pylist()],
            "length": np.asarray(decoded.column("length").to_pylist(), dtype=np.int64),
            "chunk_index": np.asarray(decoded.column("chunk_index").to_pylist(), dtype=np.int64),
        }
        parts: dict[str, list] = {k: [] for k in ("utt_id", "length", *ARRAY_KEYS, "mc_shape")}
        size = ray_cfg.scoring_batch_size
        for start in range(0, len(columns["utt_id"]), size):
            batch = {k: v[start : start + size] for k, v in columns.items()}
            out = actor(batch)
            for key in parts:
                parts[key].append(np.asarray(out[key]))
        return parts
    finally:
        torch.set_num_threads(threads)


def score_rows(
    rows: list[dict[str, Any]],
    model_dir: str | os.PathLike,
    *,
    audio: AudioConfig,
    ray_cfg,
    mc_samples: int,
    seed: int,
    cache_root: str | os.PathLike,
) -> PoolScores:
    """Score ``rows`` (utt_id, path) with the classifier in ``model_dir`` (cached)."""
    from after_ray.training.scoring import average_chunks

    wanted = {r["utt_id"] for r in rows}
    cache_dir = Path(cache_root) / cache_key(model_dir, mc_samples, seed, audio)
    cached = read_scores(cache_dir, wanted)
    if cached is not None:
        log.info("scores for %d utterances read from cache %s", len(wanted), cache_dir)
        return cached.take(sorted(wanted))

    if in_process(ray_cfg, len(rows)):
        parts = _score_in_process(rows, model_dir, audio, ray_cfg, mc_samples, seed)
    else:
        parts = _score_on_actor_pool(rows, model_dir, audio, ray_cfg, mc_samples, seed)
    n_chunks = sum(len(p) for p in parts["utt_id"])
    if not n_chunks:
        raise RuntimeError("scoring produced no rows: every file failed to decode")
    mc_shape = tuple(int(v) for v in parts["mc_shape"][0][0])
    flat = {
        "utt_id": np.concatenate(parts["utt_id"]).astype(object),
        "lengths": np.concatenate(parts["length"]).astype(np.int64),
        "probs": np.concatenate(parts["probs"]),
        "embedding": np.concatenate(parts["embedding"]),
        "penultimate": np.concatenate(parts["penultimate"]),
        "mc_probs": np.concatenate(parts["mc_probs"]).reshape(n_chunks, *mc_shape),
    }
    del parts
    failpoint("score")
    merged = average_chunks(flat)
    del flat
    # In stream order: the cache reader and the take below both put the rows in utt_id order.
    scores = PoolScores(
        utt_ids=merged["utt_id"],
        probs=merged["probs"],
        embedding=merged["embedding"],
        penultimate=merged["penultimate"],
        mc_probs=merged["mc_probs"],
    )
    write_scores(cache_dir, scores)
    return scores.take(sorted(wanted & set(scores.utt_ids.tolist())))
