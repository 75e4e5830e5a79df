"""Pool scoring returns the VALUES of a forward pass, and strategies record the scores they rank by.

A saved checkpoint of the tiny classifier scores a small pool of WAV files through the real path
(``distributed.scoring.score_rows`` -> Ray Data decode + ``ScoringActor`` actor pool -> chunk
averaging -> score cache), and every output is held to a reference computed here:

- ``probs`` / ``embedding`` / ``penultimate``: a forward pass of the same checkpoint, run through
  Hugging Face's own ``Wav2Vec2Model.forward`` (not the classifier's re-implementation of the
  encoder), on each chunk of the same decoded audio ALONE (no padding), then mean-pooled, passed
  through the head's weights by hand (``x @ W.T + b``) and averaged over an utterance's chunks by
  chunk length;
- ``mc_probs``: the documented seed rule (``training/scoring.py``): per scored batch,
  ``torch.manual_seed(blake2b_seed(seed, "mc-dropout"))``, every ``nn.Dropout`` on and the rest
  in eval mode, T passes. Exact per chunk with ``scoring_batch_size`` 1; with the pipeline's
  batch size every batch of the stream is recovered as a run of consecutive rows whose seeded
  passes give exactly the stored samples;
- the per-row ``score`` column of ``selection.parquet`` (written by the runner's ``_select``) for
  every registered strategy: entropy, least confidence, margin, BALD by hand in numpy; strategies
  without a per-item score must record None, and must do so because they do not define one.

Tolerances: 1e-5 absolute (and relative) between the pipeline and the reference forward pass:
both are float32, and the pipeline scores padded batches (a different summation order in the
CNN and the masked GroupNorm) while the reference scores each chunk alone; the observed
differences are ~1e-7. Strategy scores are checked exactly (1e-12) against numpy on the stored
probabilities, and to 1e-4 against the reference forward pass (entropy/BALD amplify 1e-5).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from after_ray.al.strategies import STRATEGIES
from after_ray.al.strategies.base import Strategy
from after_ray.config.audio import AudioConfig
from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.config.sections import RayConfig, config_from_dict
from after_ray.data.audio import load_for_model
from after_ray.distributed.scoring import score_rows
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.models.classifier_io import load_classifier, save_classifier
from after_ray.pipeline.runner import Selectors, _select
from after_ray.seeding import blake2b_seed
from after_ray.store.run_state import RunState

CLASS_NAMES = ["angry", "happy", "neutral", "sad"]
T = 6  # MC-dropout samples
SEED = 11
ATOL = 1e-5


# ------------------------------------------------------------------------------------ fixtures
def _write_pool(root: Path) -> list[dict]:
    """24 utterances, 4 speakers: noisy tones of 0.35-0.9 s, two at 22.05 kHz (resampled), two
    of 1.3 s (chunked when ``score_chunk_s`` is short)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        rate = 22050 if i in (5, 17) else 16000
        seconds = 1.3 if i in (3, 14) else float(rng.uniform(0.35, 0.9))
        t = np.arange(int(seconds * rate)) / rate
        f0 = rng.uniform(100, 1200)
        x = np.sin(2 * np.pi * f0 * t) * rng.uniform(0.1, 0.6)
        x += rng.uniform(0.01, 0.2) * rng.standard_normal(len(t))
        path = root / f"u{i:02d}.wav"
        sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
        rows.append({"utt_id": f"u{i:02d}", "path": str(path), "speaker": f"s{i % 4}"})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_values")
    (root / "wav").mkdir()
    rows = _write_pool(root / "wav")
    cfg = dataclasses.replace(FinetuneConfig(), proj_size=8, head_dropout=0.3, seed=4)
    backbone = load_backbone(BackboneConfig(name_or_path="tiny", seed=4), for_pretraining=False)
    model = build_classifier(backbone, len(CLASS_NAMES), cfg)
    # A sharper head than the initialisation (whose probabilities are all near 1/4), so the
    # uncertainty scores differ from row to row.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen))
        model.projector.weight.mul_(2.0)
    model_dir = save_classifier(model, root / "model", class_names=CLASS_NAMES, finetune_cfg=cfg)
    reloaded, _ = load_classifier(model_dir)
    return {"root": root, "rows": rows, "model_dir": model_dir, "model": reloaded.eval()}


def _score(
    setup, ray_session, *, batch_size: int, chunk_s: float, tag: str, in_process: bool = False
):
    audio = AudioConfig(score_chunk_s=chunk_s)
    # in_process_scoring_max_rows 0: the Ray Data actor pool, never the driver shortcut; 2000
    # (the default): the driver shortcut the tiny run and the demo take (num_workers 0).
    ray_cfg = RayConfig(
        num_workers=0,
        scoring_batch_size=batch_size,
        in_process_scoring_max_rows=2000 if in_process else 0,
    )
    kwargs = dict(
        audio=audio,
        ray_cfg=ray_cfg,
        mc_samples=T,
        seed=SEED,
        cache_root=setup["root"] / f"cache-{tag}",
    )
    scores = score_rows(setup["rows"], setup["model_dir"], **kwargs)
    return scores, audio, kwargs


# ----------------------------------------------------------------------------- the reference
def _chunks(setup, audio: AudioConfig) -> dict[str, list[np.ndarray]]:
    """The decoded audio the pipeline scores: per utterance, its normalised chunks."""
    return {r["utt_id"]: load_for_model(r["path"], audio, "score") for r in setup["rows"]}


@torch.no_grad()
def _reference_forward(model, chunk: np.ndarray) -> dict[str, np.ndarray]:
    """Embedding, penultimate and probabilities of one chunk: HF's Wav2Vec2Model.forward on the
    unpadded waveform, frame mean, then the head's linear layers by hand."""
    hidden = model.backbone(input_values=torch.from_numpy(chunk)[None]).last_hidden_state[0]
    pooled = hidden.mean(dim=0)
    penultimate = pooled @ model.projector.weight.T + model.projector.bias
    logits = penultimate @ model.classifier.weight.T + model.classifier.bias
    return {
        "embedding": pooled.numpy(),
        "penultimate": penultimate.numpy(),
        "probs": torch.softmax(logits.double(), dim=-1).numpy(),
    }


@torch.no_grad()
def _reference_mc(model, batch: list[np.ndarray]) -> np.ndarray:
    """[B, T, C]: T seeded dropout-on passes over one padded batch (the documented rule)."""
    width = max(len(x) for x in batch)
    values = torch.zeros(len(batch), width)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, x in enumerate(batch):
        values[i, : len(x)] = torch.from_numpy(x)
        mask[i, : len(x)] = 1
    features, frame_mask = model.encode_cnn(values, mask)  # no dropout in the CNN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(blake2b_seed(SEED, "mc-dropout"))
        model.eval()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train()
        try:
            samples = [
                torch.softmax(model(cnn_features=features, frame_mask=frame_mask).float(), dim=-1)
                for _ in range(T)
            ]
        finally:
            model.eval()
    return torch.stack(samples, dim=1).numpy()


def _length_average(values: list[np.ndarray], lengths: list[int]) -> np.ndarray:
    w = np.asarray(lengths, dtype=np.float64)
    return np.tensordot(w / w.sum(), np.stack(values).astype(np.float64), axes=1)


def _reference(setup, audio: AudioConfig) -> dict[str, dict[str, np.ndarray]]:
    model = setup["model"]
    out = {}
    for utt, pieces in _chunks(setup, audio).items():
        per_chunk = [_reference_forward(model, x) for x in pieces]
        lengths = [len(x) for x in pieces]
        out[utt] = {
            key: _length_average([c[key] for c in per_chunk], lengths)
            for key in ("embedding", "penultimate", "probs")
        }
        out[utt]["mc_probs"] = _length_average(
            [_reference_mc(model, [x])[0] for x in pieces], lengths
        )  # what batch size 1 gives; other batchings are checked in their own test
        out[utt]["n_chunks"] = len(pieces)
    return out


def _assert_deterministic_outputs_equal(scores, reference) -> None:
    ids = list(scores.utt_ids)
    assert ids == sorted(reference)  # every utterance scored, none dropped
    for key, got in (
        ("probs", scores.probs),
        ("embedding", scores.embedding),
        ("penultimate", scores.penultimate),
    ):
        want = np.stack([reference[u][key] for u in ids])
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=ATOL, atol=ATOL, err_msg=key)
    # Not a vacuous comparison: the rows differ from each other and are not near-uniform.
    assert np.ptp(scores.embedding, axis=0).max() > 1e-2
    assert np.ptp(scores.penultimate, axis=0).max() > 1e-2
    assert scores.probs.max() - scores.probs.min() > 0.2


# ---------------------------------------------------------------------------------- the tests
@pytest.mark.timeout(600)
def test_scores_equal_a_forward_pass_chunked_and_batch_of_one(setup, ray_session):
    """score_chunk_s 0.5 s (the 1.3 s files are cut in 3, the others in 1 or 2), one chunk per
    batch: every output, MC samples included, equals the reference exactly (within ATOL)."""
    scores, audio, kwargs = _score(setup, ray_session, batch_size=1, chunk_s=0.5, tag="b1")
    reference = _reference(setup, audio)
    assert max(r["n_chunks"] for r in reference.values()) == 3  # chunk averaging is exercised
    assert sum(r["n_chunks"] > 1 for r in reference.values()) >= 4
    _assert_deterministic_outputs_equal(scores, reference)
    want_mc = np.stack([reference[u]["mc_probs"] for u in scores.utt_ids])
    assert scores.mc_probs.shape == (24, T, len(CLASS_NAMES))
    np.testing.assert_allclose(scores.mc_probs, want_mc, rtol=ATOL, atol=ATOL)
    # MC samples are dropout draws, not copies of the eval pass.
    det = scores.probs[:, None, :]
    assert np.abs(scores.mc_probs - det).max() > 1e-2
    assert (scores.mc_probs.std(axis=1).max(axis=-1) > 1e-4).all()

    # The cache gives back the same values (a resumed run reads it).
    again = score_rows(setup["rows"], setup["model_dir"], **kwargs)
    for key in ("probs", "embedding", "penultimate", "mc_probs"):
        np.testing.assert_array_equal(getattr(again, key), getattr(scores, key))


@pytest.fixture(scope="module")
def pipeline_scores(setup, ray_session):
    """The pool scored as the tiny run scores it: batches of 8, no chunking (10 s chunks)."""
    scores, audio, _ = _score(setup, ray_session, batch_size=8, chunk_s=10.0, tag="b8")
    return scores, audio, _reference(setup, audio)


def _recover_batches(model, chunks: list[np.ndarray], got: np.ndarray, batch_size: int):
    """Cut the stream into consecutive batches of <= batch_size rows whose seeded MC passes equal
    the stored samples (a batch's masks depend on its size and padding, so a wrong cut fails)."""
    sizes, start = [], 0
    while start < len(chunks):
        for size in range(min(batch_size, len(chunks) - start), 0, -1):
            want = _reference_mc(model, chunks[start : start + size])
            if np.allclose(want, got[start : start + size], rtol=ATOL, atol=ATOL):
                sizes.append(size)
                start += size
                break
        else:
            raise AssertionError(
                f"MC samples of rows {start}.. match no seeded batch of 1..{batch_size} rows"
            )
    return sizes


@pytest.mark.timeout(600)
def test_scores_equal_a_forward_pass_with_the_pipelines_batching(setup, pipeline_scores):
    scores, audio, reference = pipeline_scores
    assert all(r["n_chunks"] == 1 for r in reference.values())
    _assert_deterministic_outputs_equal(scores, reference)

    # MC: the rows stream in input order (rows were given sorted by utt_id, the order of
    # scores), so the stream's batches are consecutive runs of rows.
    chunks = [_chunks(setup, audio)[u][0] for u in scores.utt_ids]
    sizes = _recover_batches(setup["model"], chunks, scores.mc_probs, 8)
    assert sum(sizes) == 24 and max(sizes) > 1  # batched, not one row at a time
    # Each sample is a genuine dropout pass around the deterministic one: different from it,
    # different from each other, and their mean near it.
    det = scores.probs[:, None, :]
    assert np.abs(scores.mc_probs - det).max() > 1e-2
    assert (scores.mc_probs.std(axis=1).max(axis=-1) > 1e-4).all()
    assert np.abs(scores.mc_probs.mean(axis=1) - scores.probs).mean() < 0.1
    np.testing.assert_allclose(scores.mc_probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.timeout(600)
def test_in_process_scoring_gives_the_same_values(setup, ray_session, pipeline_scores):
    """The driver shortcut (num_workers 0, small sets: what the tiny run and the demo use) holds
    to the same reference, and its batches are the documented consecutive cuts of 8."""
    _, _, reference = pipeline_scores
    scores, audio, _ = _score(
        setup, ray_session, batch_size=8, chunk_s=10.0, tag="inproc", in_process=True
    )
    _assert_deterministic_outputs_equal(scores, reference)
    chunks = [_chunks(setup, audio)[u][0] for u in scores.utt_ids]
    assert _recover_batches(setup["model"], chunks, scores.mc_probs, 8) == [8, 8, 8]


# ------------------------------------------------------------------------ strategies' records
def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _neg_margin(p: np.ndarray) -> np.ndarray:
    top = np.sort(np.asarray(p, np.float64), axis=-1)
    return -(top[..., -1] - top[..., -2])


def _bald(mc: np.ndarray) -> np.ndarray:
    return _entropy(mc.mean(axis=1)) - _entropy(mc).mean(axis=1)


# name (or name + params) -> the per-item score it must record, from (probs, mc_probs); None:
# the strategy has no per-item score (set-based or random) and records None.
EXPECTED_SCORE = {
    "random": None,
    "entropy": lambda p, mc: _entropy(p),
    "least_confidence": lambda p, mc: 1.0 - np.max(p.astype(np.float64), axis=-1),
    "margin": lambda p, mc: _neg_margin(p),
    "bald": lambda p, mc: _bald(mc.astype(np.float64)),
    "coreset": None,
    "badge": None,
    "cluster_margin": lambda p, mc: _neg_margin(p),  # its pre-filter's ranking
    "typiclust": None,
    "after_init": None,
    "alps": None,
    "after": lambda p, mc: _neg_margin(p),  # default uncertainty: margin
}
# The hybrid's other pre-filters record their own measure.
EXTRA_CASES = {
    ("after", "entropy"): lambda p, mc: _entropy(p),
    ("after", "least_confidence"): lambda p, mc: 1.0 - np.max(p.astype(np.float64), axis=-1),
    ("after", "bald"): lambda p, mc: _bald(mc.astype(np.float64)),
}
CASES = [(name, None) for name in EXPECTED_SCORE] + [(n, u) for n, u in EXTRA_CASES]


def test_every_registered_strategy_has_an_expected_score():
    assert set(EXPECTED_SCORE) == set(STRATEGIES)


def _recorded(setup, scores, tmp_path: Path, name: str, uncertainty: str | None):
    """Run the runner's selection step for round 1 (3 items labeled in round 0) and return
    (chosen ids, the selection table's score column)."""
    params = {"uncertainty": uncertainty} if uncertainty else {}
    config = config_from_dict(
        {
            "run": {"name": "scores", "output_dir": str(tmp_path / "runs"), "seed": 5},
            "al": {
                "strategy": name,
                "strategy_params": params,
                "mc_dropout_samples": T,
                "budget": {"unit": "count", "initial": 3, "per_round": 5, "max_total": 8},
            },
        }
    )
    rows = setup["rows"]
    durations = {r["utt_id"]: 0.5 for r in rows}
    with RunState.open(config.run_dir) as state:
        seed_ids = ["u00", "u07", "u15"]
        state.record_selection(0, seed_ids, None, strategy="random")
        state.append_labels(
            0,
            [
                {"utt_id": u, "label": CLASS_NAMES[i], "source": "test"}
                for i, u in enumerate(seed_ids)
            ],
        )
        chosen = _select(
            config, state, 1, 8, rows, scores, durations, Selectors.from_config(config)
        )
        table = state.selection_table(1)
    assert table.column("utt_id").to_pylist() == chosen
    assert len(chosen) == 5 and not set(chosen) & set(seed_ids)
    return chosen, table.column("score").to_pylist()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "uncertainty"), CASES, ids=[f"{n}-{u}" for n, u in CASES])
def test_recorded_selection_scores_equal_a_hand_computation(
    setup, pipeline_scores, tmp_path, name, uncertainty
):
    scores, _audio, reference = pipeline_scores
    chosen, recorded = _recorded(setup, scores, tmp_path, name, uncertainty)
    expected = EXTRA_CASES[(name, uncertainty)] if uncertainty else EXPECTED_SCORE[name]
    cls = STRATEGIES[name]
    if expected is None:
        # Deliberately None: the strategy does not define a per-item score (it inherits the
        # base class's "no score"), so the runner records None, not a swallowed error.
        assert cls.score is Strategy.score, f"{name} defines score(): add its reference"
        assert recorded == [None] * len(chosen)
        return
    assert cls.score is not Strategy.score
    assert None not in recorded, f"{name} recorded no score (did score() raise?)"
    taken = scores.take(chosen)
    want = expected(taken.probs, taken.mc_probs)
    np.testing.assert_allclose(recorded, want, rtol=1e-12, atol=1e-12)
    # And against the independent forward pass (a few 1e-5 of probability error amplified).
    ref_probs = np.stack([reference[u]["probs"] for u in chosen])
    if name != "bald" and uncertainty != "bald":
        np.testing.assert_allclose(recorded, expected(ref_probs, None), atol=1e-4)
    # Score-ranked strategies pick in descending score order (the after/cluster_margin
    # families re-order by diversity, so only the plain ones are checked).
    if name in ("entropy", "least_confidence", "margin", "bald"):
        assert recorded == sorted(recorded, reverse=True)
