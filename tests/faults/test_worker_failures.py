"""Worker failures (issue #7): a scoring actor of the Ray Data pool killed mid-scoring.

The kill is a real SIGKILL from a failpoint (``after_ray.faults``) in the actor process, armed
with ``AFTER_RAY_FAILPOINT_ONCE`` so that exactly one process dies; the test checks the marker
file the dying process creates, so it cannot pass without a kill. Tune trials killed once or
failing for good are tested in tests/integration/test_sweep.py, next to its tiny sweep setup.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from after_ray import faults
from after_ray.config.audio import AudioConfig
from after_ray.config.sections import config_from_dict

N_UTTERANCES = 30
# The actor pool even for this small set (in-process scoring would kill the test process).
SCORING = {
    "scoring_actors": 2, "scoring_batch_size": 4, "num_workers": 0, "in_process_scoring_max_rows": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory):
    """A tiny random classifier and 30 short WAVs (0.4-2.5 s; with 1 s chunks, the longer ones
    are scored in up to 3 chunks that may land in different batches and actors)."""
    from after_ray.config.backbone import BackboneConfig
    from after_ray.config.finetune import FinetuneConfig
    from after_ray.models.backbones import load_backbone
    from after_ray.models.classifier import build_classifier
    from after_ray.models.classifier_io import save_classifier

    tmp = tmp_path_factory.mktemp("scoring")
    cfg = FinetuneConfig()
    backbone = load_backbone(BackboneConfig(name_or_path="tiny", seed=5), for_pretraining=False)
    model_dir = save_classifier(
        build_classifier(backbone, 4, cfg).eval(), tmp / "model",
        class_names=["neutral", "happy", "angry", "sad"], finetune_cfg=cfg,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_UTTERANCES):
        path = tmp / "wav" / f"u{i:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        n = int(rng.integers(6400, 40000))
        sf.write(path, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        rows.append({"utt_id": f"u{i:02d}", "path": str(path)})
    return model_dir, rows


def _score(setup, cache_root: Path, **ray_settings):
    from after_ray.distributed.scoring import score_rows

    model_dir, rows = setup
    return score_rows(
        rows,
        model_dir,
        audio=AudioConfig(score_chunk_s=1.0),
        ray_cfg=config_from_dict({"ray": {**SCORING, **ray_settings}}).ray,
        mc_samples=3,
        seed=11,
        cache_root=cache_root,
    )


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_killed_scoring_actor_is_restarted_and_the_scores_are_unchanged(
    ray_session, scoring_setup, tmp_path, monkeypatch, caplog
):
    """One of the two scoring actors dies (SIGKILL) at its second batch; Ray restarts it and
    retries its batches, and the scores equal an unkilled scoring of the same rows exactly.

    Why MC-dropout samples are equal too: every batch reseeds dropout from the run seed alone
    (``score_batch``), and a retried batch holds the same rows in the same order as the lost one
    (``score_rows`` keeps Ray Data's order; batches are cut from the same input blocks). The
    draws depend on a row's position in its batch, not on which actor or attempt scores it.
    """
    from after_ray.store.score_cache import DONE, read_scores

    with caplog.at_level(logging.INFO, logger="ray.data"):
        clean = _score(scoring_setup, tmp_path / "clean")
    # The restart options are Ray Data's actor-pool defaults, not passed by score_rows: remote
    # args of its own would stop the decoding from being fused into the scoring actors (decode
    # tasks would then need CPUs beside the actors, and a sweep deadlocks).
    assert "ActorPoolMapOperator[MapBatches(decode_batch)->MapBatches(ScoringActor)]" in (
        caplog.text
    )

    marker = tmp_path / "actor-killed"
    monkeypatch.setenv(faults.ENV, "score_actor_batch@2")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    killed = _score(scoring_setup, tmp_path / "killed")
    assert marker.is_file(), "no scoring actor reached its second batch: nothing was killed"

    assert list(killed.utt_ids) == list(clean.utt_ids) == [f"u{i:02d}" for i in range(30)]
    for key in ("probs", "embedding", "penultimate", "mc_probs"):
        np.testing.assert_array_equal(getattr(killed, key), getattr(clean, key), err_msg=key)
    assert killed.mc_probs.shape == (N_UTTERANCES, 3, 4)

    # The cache written after the kill is complete: read back alone, it gives the same scores.
    (cache_dir,) = [p for p in (tmp_path / "killed").iterdir() if p.is_dir()]
    assert (cache_dir / DONE).is_file()
    cached = read_scores(cache_dir, {r["utt_id"] for r in scoring_setup[1]})
    assert cached is not None and list(cached.utt_ids) == list(clean.utt_ids)
    for key in ("probs", "embedding", "penultimate", "mc_probs"):
        np.testing.assert_array_equal(getattr(cached, key), getattr(clean, key), err_msg=key)


@pytest.mark.ray
def test_in_process_scoring_of_a_small_set_equals_the_actor_pool(
    ray_session, scoring_setup, tmp_path
):
    """The driver path for small sets (no actor start-up) gives the actor pool's scores: the
    same chunks, averaged the same way. MC-dropout samples come from the same distribution but
    are other draws (a draw depends on the row's position in its batch, and Ray Data cuts the
    pool's batches along its blocks); they are reproducible run to run."""
    pool = _score(scoring_setup, tmp_path / "pool")
    local = _score(scoring_setup, tmp_path / "local", in_process_scoring_max_rows=N_UTTERANCES)
    assert list(local.utt_ids) == list(pool.utt_ids)
    for key in ("probs", "embedding", "penultimate"):
        np.testing.assert_allclose(getattr(local, key), getattr(pool, key), rtol=1e-5, atol=1e-6)
    assert local.mc_probs.shape == pool.mc_probs.shape == (N_UTTERANCES, 3, 4)
    assert np.ptp(local.mc_probs, axis=1).max() > 0  # real dropout samples, not copies
    again = _score(scoring_setup, tmp_path / "again", in_process_scoring_max_rows=N_UTTERANCES)
    np.testing.assert_array_equal(again.mc_probs, local.mc_probs)
