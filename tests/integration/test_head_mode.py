"""finetune.mode: head -- layer-statistics pooling, the head trainer, and cached-feature scoring
against a direct forward pass from audio."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import build_classifier
from after_ray.training.head import fit_head, head_outputs, pool_standardisation
from after_ray.training.scoring import score_batch

CLASSES = ["a", "b", "c"]


def _model(seed: int = 0, **finetune):
    cfg = FinetuneConfig(mode="head", pooling="layer_stats", seed=seed, **finetune)
    backbone = load_backbone(BackboneConfig(name_or_path="tiny", seed=seed), for_pretraining=False)
    return build_classifier(backbone, len(CLASSES), cfg).eval()


def _audio(lengths, seed=0):
    rng = np.random.default_rng(seed)
    batch = np.zeros((len(lengths), max(lengths)), dtype=np.float32)
    mask = np.zeros_like(batch, dtype=np.int64)
    for i, n in enumerate(lengths):
        batch[i, :n] = rng.normal(size=n) * np.sin(np.linspace(0, 40 * (i + 1), n))
        mask[i, :n] = 1
    return torch.from_numpy(batch), torch.from_numpy(mask)


def _hand_statistics(model, wave: torch.Tensor) -> torch.Tensor:
    """Mean and population std over frames of every layer, computed without the model's pooling
    code: CNN output, projected features, then each Transformer layer (via forward hooks)."""
    base = model.backbone
    with torch.no_grad():
        cnn = base.feature_extractor(wave[None]).transpose(1, 2)[0]
        projected = base.feature_projection(cnn[None])
        hidden = projected[0] if isinstance(projected, tuple) else projected
        outputs = []
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, o: outputs.append(o[0] if isinstance(o, tuple) else o)
            )
            for layer in base.encoder.layers
        ]
        base.encoder(hidden)
        for hook in hooks:
            hook.remove()
    layers = [cnn, hidden[0]] + [o[0] for o in outputs]
    return torch.cat([torch.cat([x.mean(0), x.std(0, unbiased=False)]) for x in layers])


def test_layer_stats_pooling_equals_hand_computation_and_ignores_padding():
    model = _model()
    waves, mask = _audio([16000, 9000])
    with torch.no_grad():
        pooled = model.forward_features(waves, mask).pooled
    assert pooled.shape == (2, model.pooled_size)
    for i, n in enumerate([16000, 9000]):
        expected = _hand_statistics(model, waves[i, :n])
        torch.testing.assert_close(pooled[i], expected, atol=2e-4, rtol=1e-4)


def test_head_fit_separates_classes_picks_l2_on_validation_and_is_deterministic():
    rng = np.random.default_rng(0)
    model = _model()
    dim = model.pooled_size
    centers = rng.normal(size=(3, dim)) * 3
    y = np.repeat(np.arange(3), [60, 20, 10])  # skewed: class weights matter
    x = centers[y] + rng.normal(size=(len(y), dim))
    yv = np.repeat(np.arange(3), 10)
    xv = centers[yv] + rng.normal(size=(len(yv), dim))
    shift, scale = pool_standardisation(x)
    model.set_pooled_standardisation(torch.as_tensor(shift), torch.as_tensor(scale))
    # Label noise in the training set: the weakest L2 overfits it, validation decides.
    noisy = y.copy()
    noisy[rng.choice(len(y), 25, replace=False)] = rng.integers(0, 3, 25)
    grid = (1e-4, 1e-2, 1.0)
    fit = fit_head(model, x, np.eye(3)[noisy], xv, yv, class_names=CLASSES, l2_grid=grid,
                   class_weighted=True, seed=5)  # fmt: skip
    assert sorted(fit.val_ua_by_l2) == sorted(grid)
    best = max(fit.val_ua_by_l2.values())
    # Ties go to the strongest L2 (the simplest head).
    assert fit.l2 == max(v for v in grid if fit.val_ua_by_l2[v] == best)
    # The grid is fitted as a warm-started continuation; each L2's optimum is the one a fit
    # from scratch finds (strictly convex objective).
    for l2 in grid:
        alone = _model()
        alone.set_pooled_standardisation(torch.as_tensor(shift), torch.as_tensor(scale))
        single = fit_head(alone, x, np.eye(3)[noisy], xv, yv, class_names=CLASSES,
                          l2_grid=(l2,), class_weighted=True, seed=5)  # fmt: skip
        assert single.val_ua_by_l2[l2] == fit.val_ua_by_l2[l2]
    assert fit.val_report["ua"] == best >= 0.9
    first = model.classifier.weight.detach().clone()
    again = _model()
    again.set_pooled_standardisation(torch.as_tensor(shift), torch.as_tensor(scale))
    fit_head(again, x, np.eye(3)[noisy], xv, yv, class_names=CLASSES, l2_grid=grid,
             class_weighted=True, seed=5)  # fmt: skip
    assert torch.equal(first, again.classifier.weight)


def test_cached_feature_scores_equal_scoring_the_model_from_audio():
    """What a head-mode round computes from the cache equals score_batch on the same saved
    classifier from the waveform (the path `after-ray score` and the actors take)."""
    model = _model(seed=1, head_dropout=0.2)
    waves, mask = _audio([12000, 16000, 7000, 10000], seed=3)
    with torch.no_grad():
        raw = model.forward_features(waves, mask).pooled.numpy()  # identity standardisation
    shift, scale = pool_standardisation(raw)
    model.set_pooled_standardisation(torch.as_tensor(shift), torch.as_tensor(scale))
    fit_head(model, raw, np.eye(3)[[0, 1, 2, 0]], raw, np.array([0, 1, 2, 0]),
             class_names=CLASSES, l2_grid=(1e-2,), class_weighted=True, seed=0)  # fmt: skip
    cached = head_outputs(model, raw, mc_samples=0, seed=0)
    batch = {"utt_id": ["u0", "u1", "u2", "u3"], "input_values": waves, "attention_mask": mask}
    direct = score_batch(model, batch, mc_samples=0, seed=0)
    for key in ("probs", "embedding", "penultimate"):
        np.testing.assert_allclose(cached[key], direct[key], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(cached["embedding"], (raw - shift) / scale, atol=1e-5)
    assert not np.allclose(cached["probs"], 1 / 3)  # a trained head, not a uniform stub
    samples = head_outputs(model, raw, mc_samples=4, seed=7)["mc_probs"]
    assert samples.shape == (4, 4, 3)
    assert not np.allclose(samples[:, 0], samples[:, 1])  # dropout on: the samples differ
    np.testing.assert_array_equal(
        samples, head_outputs(model, raw, mc_samples=4, seed=7)["mc_probs"]
    )


def test_head_mode_config_rejects_attentive_pooling():
    problems = FinetuneConfig(mode="head", pooling="attentive").validate()
    assert any("finetune.pooling" in p and "layer_stats" in p for p in problems)
    assert FinetuneConfig(mode="head", pooling="layer_stats").validate() == []
    assert any("finetune.mode" in p for p in FinetuneConfig(mode="both").validate())


def test_layer_stats_head_cannot_be_exported(tmp_path):
    from after_ray.errors import AfterRayError
    from after_ray.models.export import export_hf

    with pytest.raises(AfterRayError, match="layer_stats"):
        export_hf(_model(), CLASSES, tmp_path / "hf")


# ----------------------------------------------------------------------- the runner, end to end
@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    from tiny_run import synth_corpus

    return synth_corpus(tmp_path_factory.mktemp("head-corpus") / "synth")


@pytest.mark.ray
@pytest.mark.slow
def test_a_head_mode_run_reads_audio_once_and_its_models_score_like_the_actor_path(
    ray_session, corpus_root, tmp_path
):
    from tiny_run import outcome, tiny_config

    from after_ray.config.sections import config_from_dict
    from after_ray.data.manifest import read_manifest
    from after_ray.distributed.scoring import score_rows
    from after_ray.pipeline.head_rounds import FeatureSpace
    from after_ray.pipeline.runner import run_active_learning

    data = tiny_config(tmp_path, corpus_root, finetune={"mode": "head", "pooling": "layer_stats"})
    config = config_from_dict(data)
    assert run_active_learning(config).finished
    timings = json.loads((config.run_dir / "state.json").read_text())["timings"]
    stages = [t["stage"] for t in timings]
    assert stages.count("features") == 1 and "embed" not in stages
    # one feature pass for the whole output dir: a second run (another seed) reuses it
    other = config_from_dict({**data, "run": {**data["run"], "name": "other", "seed": 4}})
    assert run_active_learning(other).finished
    assert len([p for p in (tmp_path / "runs" / "_features").iterdir() if p.is_dir()]) == 1
    assert outcome(other.run_dir)["selections"] != outcome(config.run_dir)["selections"]

    # the last round's model, scored from audio by the Ray Data actors, gives the probabilities
    # the run computed from the cache
    rows = read_manifest(config.run_dir / "manifest.parquet").to_pylist()
    test_rows = [r for r in rows if r["split"] == "test"]
    model_dir = config.run_dir / "rounds" / "round_002" / "model"
    actor_pool = dataclasses.replace(config.ray, in_process_scoring_max_rows=0)
    from_audio = score_rows(test_rows, model_dir, audio=config.audio, ray_cfg=actor_pool,
                            mc_samples=0, seed=0, cache_root=tmp_path / "check")  # fmt: skip
    from after_ray.store.run_state import RunState

    with RunState.open(config.run_dir) as state:
        backbone = state.stage_info("tapt")["backbone_dir"]
        features = FeatureSpace.build(config, state, backbone, rows,
                                      [r["utt_id"] for r in rows if r["split"] == "train"],
                                      ["angry", "happy", "neutral", "sad"])  # fmt: skip
    ids = sorted(r["utt_id"] for r in test_rows)
    cached = features.score(model_dir, ids, mc_samples=0, seed=0)
    np.testing.assert_allclose(cached.probs, from_audio.take(ids).probs, atol=1e-5)
    metrics = json.loads((model_dir.parent / "metrics.json").read_text())
    predicted = cached.probs.argmax(axis=1)
    index = {c: i for i, c in enumerate(metrics["test"]["class_names"])}
    truth = {r["utt_id"]: index[r["label"]] for r in test_rows}
    assert metrics["test"]["wa"] == pytest.approx(
        float(np.mean([predicted[i] == truth[u] for i, u in enumerate(ids)]))
    )


def test_speaker_standardise_gives_each_speaker_mean_0_std_1_and_leaves_the_rest():
    from after_ray.pipeline.head_rounds import speaker_standardise

    rng = np.random.default_rng(3)
    # A big per-speaker offset and scale, as voices put on pooled features.
    x = np.concatenate([rng.normal(5, 3, (6, 4)), rng.normal(-2, 0.5, (5, 4)), [[1, 2, 3, 4]],
                        [[7, 7, 7, 7]]])  # fmt: skip
    speakers = ["a"] * 6 + ["b"] * 5 + ["c"] + [None]
    out = speaker_standardise(x, speakers)
    for rows in (slice(0, 6), slice(6, 11)):
        block = x[rows]
        np.testing.assert_allclose(out[rows], (block - block.mean(0)) / block.std(0), atol=1e-5)
    np.testing.assert_array_equal(out[11], [0, 0, 0, 0])  # one utterance: centred only
    np.testing.assert_array_equal(out[12], x[12])  # no speaker: untouched


def test_the_kept_round_model_scores_like_its_checkpoint_reloaded(tmp_path, monkeypatch):
    """A round's scoring applies the model kept in memory after training (no reload: it was a
    sixth of the demo's AL loop); a FeatureSpace without it (a resumed run) loads the checkpoint
    and must give the same outputs to the bit, MC-dropout samples included."""
    from tiny_run import tiny_config

    import after_ray.models.classifier_io as classifier_io
    from after_ray.config.sections import config_from_dict
    from after_ray.pipeline.head_rounds import FeatureSpace, train_round_head
    from after_ray.store.score_cache import PoolScores

    config = config_from_dict(
        tiny_config(tmp_path, tmp_path, finetune={"mode": "head", "pooling": "layer_stats"})
    )
    classes = ["angry", "happy", "neutral", "sad"]
    n, dim = 48, _model().classifier.in_features
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(classes)
    raw = rng.normal(size=(n, dim)).astype(np.float32)
    raw += rng.normal(size=(len(classes), dim)).astype(np.float32)[labels]  # class means
    ids = np.asarray([f"u{i:03d}" for i in range(n)], dtype=object)
    scores = PoolScores(ids, np.zeros((n, len(classes)), np.float32), raw, raw,
                        np.zeros((n, 0, len(classes)), np.float32))  # fmt: skip
    shift, scale = raw.mean(0), raw.std(0)

    def space() -> FeatureSpace:
        return FeatureSpace(scores=scores, shift=shift, scale=scale, model_dir=tmp_path / "f")

    rows = [{"utt_id": u, "label": classes[y]} for u, y in zip(ids, labels, strict=True)]
    out_dir = tmp_path / "round_000" / "model"
    kept = space()
    train_round_head(config, kept, backbone_dir="tiny", train_rows=rows[:32],
                     val_rows=rows[32:], class_names=classes, seed=3, out_dir=out_dir)  # fmt: skip
    loads = []
    real_load = classifier_io.load_classifier
    monkeypatch.setattr(classifier_io, "load_classifier", lambda d: loads.append(d) or real_load(d))
    in_memory = kept.score(out_dir, list(ids), mc_samples=3, seed=1)
    assert loads == []  # the kept model, not the checkpoint
    reloaded = space().score(out_dir, list(ids), mc_samples=3, seed=1)
    assert len(loads) == 1
    for key in ("probs", "embedding", "penultimate", "mc_probs"):
        np.testing.assert_array_equal(getattr(in_memory, key), getattr(reloaded, key))
    # the head learned the signal (the model scored is a trained one, not the seeded start)
    assert (in_memory.probs[32:].argmax(1) == labels[32:]).mean() >= 0.75
