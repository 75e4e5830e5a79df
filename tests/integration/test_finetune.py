"""SER classifier, fine-tuning loop, CNN feature cache and MC-dropout scoring on the tiny preset."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from after_ray.config import schema as config_schema
from after_ray.config.backbone import BackboneConfig
from after_ray.config.finetune import FinetuneConfig
from after_ray.errors import ConfigError
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import SERClassifier, SpecAugment, build_classifier
from after_ray.training.finetune import (
    CachedFeatureBatches,
    batch_targets,
    build_cnn_cache,
    class_counts_from_labels,
    class_weights_from_counts,
    evaluate,
    finetune,
    make_cached_providers,
    soft_cross_entropy,
    train_one_epoch,
)
from after_ray.training.scoring import average_chunks, score_batch

CLASS_NAMES = ["low", "mid", "high"]
# Class-dependent pitch bands (Hz) of the synthetic task.
BANDS = [(150, 250), (450, 650), (1000, 1400)]


def tones(n_per_class: int, seed: int) -> list[tuple[str, np.ndarray, int]]:
    """Noisy sinusoids of 0.5-0.9 s whose pitch band is the class, normalised per utterance."""
    rng = np.random.default_rng(seed)
    items = []
    for label, (low, high) in enumerate(BANDS):
        for k in range(n_per_class):
            n = int(rng.integers(8000, 14000))
            t = np.arange(n) / 16000
            x = np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 6.3))
            x = x + 0.3 * rng.standard_normal(n)
            items.append(
                (f"tone/{seed}/{label}/{k}", ((x - x.mean()) / x.std()).astype(np.float32), label)
            )
    return items


def make_batches(items, batch_size: int, order=None) -> list[dict]:
    order = list(range(len(items))) if order is None else list(order)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [items[i] for i in order[start : start + batch_size]]
        width = max(len(x) for _, x, _ in rows)
        values = torch.zeros(len(rows), width)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (_, x, _) in enumerate(rows):
            values[r, : len(x)] = torch.from_numpy(x)
            mask[r, : len(x)] = 1
        batches.append(
            {
                "input_values": values,
                "attention_mask": mask,
                "lengths": mask.sum(dim=1),
                "utt_id": [u for u, _, _ in rows],
                "label_index": torch.tensor([y for _, _, y in rows]),
            }
        )
    return batches


def shuffled_provider(items, batch_size: int, seed: int = 0):
    def provider(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        return make_batches(items, batch_size, order)

    return provider


def tiny_classifier(cfg: FinetuneConfig, seed: int = 0) -> SERClassifier:
    backbone = load_backbone(BackboneConfig(name_or_path="tiny", seed=seed), for_pretraining=False)
    return build_classifier(backbone, len(CLASS_NAMES), cfg)


@pytest.fixture(scope="module")
def data():
    return {"train": tones(16, 1), "val": tones(6, 2), "test": tones(10, 3)}


# ------------------------------------------------------------------------------ loss / targets
def test_soft_loss_on_one_hot_votes_equals_hard_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    one_hot = F.one_hot(labels, 4).float()
    weights = torch.tensor([0.1, 0.4, 0.3, 0.2])
    torch.testing.assert_close(
        soft_cross_entropy(logits, one_hot, weights),
        F.cross_entropy(logits, labels, weight=weights),
    )
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    # and a genuinely soft target gives a different loss than its argmax
    soft = 0.6 * one_hot + 0.1
    assert (
        abs(float(soft_cross_entropy(logits, soft)) - float(F.cross_entropy(logits, labels))) > 1e-3
    )


def test_class_weights_are_inverse_frequency_of_the_labeled_set():
    # N/n_c = 60/30, 60/10, (class without labels: the rarest present class's), 60/20
    expected = np.array([2.0, 6.0, 6.0, 3.0]) / 17.0
    np.testing.assert_allclose(class_weights_from_counts([30, 10, 0, 20]), expected)
    np.testing.assert_array_equal(class_counts_from_labels([0, 2, 2, -1, 1, 2], 4), [1, 1, 3, 0])


def test_label_aggregation_modes():
    batch = {
        "utt_id": ["a", "b", "c"],
        "label_index": torch.tensor([1, 0, -1]),
        "soft_target": torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]),
    }
    targets, labeled = batch_targets(batch, 3, "majority")
    assert targets.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert labeled.tolist() == [True, True, False]
    targets, _ = batch_targets(batch, 3, "distribution")
    torch.testing.assert_close(targets[:2], batch["soft_target"][:2])
    # "sample": one vote per utterance, seeded by (seed, epoch, utt_id): batch order is irrelevant
    first, _ = batch_targets(batch, 3, "sample", seed=3, epoch=5)
    reordered = {
        k: v[[2, 0, 1]] if torch.is_tensor(v) else [v[2], v[0], v[1]] for k, v in batch.items()
    }
    again, _ = batch_targets(reordered, 3, "sample", seed=3, epoch=5)
    torch.testing.assert_close(again[[1, 2, 0]], first)
    draws = np.array(
        [batch_targets(batch, 3, "sample", seed=0, epoch=e)[0][0].tolist() for e in range(400)]
    )
    assert draws.sum(axis=1).tolist() == [1.0] * 400
    assert draws[:, 2].sum() == 0  # a class without votes is never drawn
    assert abs(draws[:, 1].mean() - 0.75) < 0.07


# ------------------------------------------------------------------------------ the classifier
def _group_norm_classifier() -> SERClassifier:
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        layerdrop=0.0,
    )
    torch.manual_seed(0)
    return SERClassifier(Wav2Vec2Model(config), 3, seed=0).eval()


@pytest.mark.parametrize(
    "make", [_group_norm_classifier, lambda: tiny_classifier(FinetuneConfig()).eval()]
)
def test_padding_does_not_change_features_or_logits(make):
    model = make()
    gen = torch.Generator().manual_seed(1)
    lengths = [16000, 9000, 4000]
    values = torch.randn(3, 16000, generator=gen)
    mask = (torch.arange(16000)[None, :] < torch.tensor(lengths)[:, None]).long()
    values = values * mask
    with torch.no_grad():
        features, frame_mask = model.encode_cnn(values, mask)
        logits = model(values, mask)
        for row, length in enumerate(lengths):
            alone, alone_mask = model.encode_cnn(values[row : row + 1, :length])
            frames = alone.shape[1]
            assert (
                int(frame_mask[row].sum())
                == frames
                == int(model.frame_lengths(torch.tensor(length)))
            )
            torch.testing.assert_close(features[row, :frames], alone[0], atol=1e-5, rtol=1e-4)
            assert float(features[row, frames:].abs().sum()) == 0.0
            torch.testing.assert_close(
                logits[row], model(values[row : row + 1, :length])[0], atol=1e-5, rtol=1e-4
            )


def test_spec_augment_masks_only_valid_frames_and_only_in_training():
    model = tiny_classifier(FinetuneConfig())
    model.spec_augment = SpecAugment(
        time_prob=0.5, time_length=3, time_min_masks=1, channel_prob=0.0
    )
    hidden = torch.full((4, 30, model.hidden_size), 7.0)
    frame_mask = torch.arange(30)[None, :] < torch.tensor([30, 20, 10, 2])[:, None]
    torch.manual_seed(0)
    masked = model._spec_augment(hidden, frame_mask)
    changed = (masked != 7.0).any(dim=-1)
    assert not bool((changed & ~frame_mask).any())  # padding untouched
    assert bool(changed[:3].any(dim=1).all())  # every utterance got at least one span
    # in eval mode the forward pass is deterministic (no SpecAugment, no dropout)
    batch = make_batches(tones(1, 9), 3)[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(batch["input_values"], batch["attention_mask"]),
            model(batch["input_values"], batch["attention_mask"]),
        )


# ------------------------------------------------------------------------------------ training
def test_finetune_learns_a_pitch_task_and_returns_the_best_weights(data):
    cfg = FinetuneConfig(epochs=4, batch_size=8, lr=2e-3, early_stopping_patience=0)
    model = tiny_classifier(cfg)
    test_batches = make_batches(data["test"], 16)
    chance_report = evaluate(model, test_batches, CLASS_NAMES)
    result = finetune(
        cfg,
        model,
        shuffled_provider(data["train"], 8),
        lambda: make_batches(data["val"], 16),
        CLASS_NAMES,
    )
    test_report = evaluate(model, test_batches, CLASS_NAMES)
    print(
        f"tone task: UA before {chance_report['ua']:.3f}, held-out test UA "
        f"{test_report['ua']:.3f}, best epoch {result.best_epoch}, {result.timings['total_s']:.1f} s"
    )
    assert test_report["ua"] >= 0.8  # chance is 1/3
    assert test_report["ua"] > chance_report["ua"] + 0.2
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert result.best_val_ua == max(r.val_ua for r in result.history)
    assert result.class_weights == pytest.approx([1 / 3] * 3)  # balanced labeled set
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, result.best_state_dict[key])


def test_class_weights_come_from_the_labeled_batches(data):
    cfg = FinetuneConfig(epochs=1, batch_size=8)
    labeled = data["train"][:16] + data["train"][16:24] + data["train"][32:36]  # 16 / 8 / 4
    result = finetune(
        cfg,
        tiny_classifier(cfg),
        shuffled_provider(labeled, 8),
        lambda: make_batches(data["val"], 16),
        CLASS_NAMES,
    )
    np.testing.assert_allclose(result.class_weights, class_weights_from_counts([16, 8, 4]))
    assert result.class_weights[2] > result.class_weights[1] > result.class_weights[0]


def test_best_epoch_is_selected_not_the_last_and_patience_stops(data):
    """Validation labels are rigged from the model's own predictions: UA is 1 at epoch 2 and 0
    at every other epoch, so the kept weights must be epoch 2's."""
    cfg = FinetuneConfig(epochs=8, batch_size=8, lr=2e-3, early_stopping_patience=2)
    model = tiny_classifier(cfg)
    val = make_batches(data["val"], 64)[0]
    calls = {"n": 0}

    def rigged_val():
        with torch.no_grad():
            model.eval()
            predicted = model(val["input_values"], val["attention_mask"]).argmax(dim=1)
        epoch = calls["n"]
        calls["n"] += 1
        labels = predicted if epoch == 2 else (predicted + 1) % 3
        return [dict(val, label_index=labels)]

    snapshots = {}

    def remember(record, m):
        snapshots[record.epoch] = copy.deepcopy(m.state_dict())

    result = finetune(
        cfg,
        model,
        shuffled_provider(data["train"], 8),
        rigged_val,
        CLASS_NAMES,
        on_epoch_end=remember,
    )
    assert [r.val_ua for r in result.history] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert result.best_epoch == 2 and result.stopped_early
    last = snapshots[4]
    assert any(not torch.equal(last[k], snapshots[2][k]) for k in last)
    for key, value in result.best_state_dict.items():
        torch.testing.assert_close(value, snapshots[2][key])
        torch.testing.assert_close(model.state_dict()[key], snapshots[2][key])


def test_same_seed_gives_the_same_result(data):
    cfg = FinetuneConfig(epochs=2, batch_size=8, label_aggregation="sample")
    items = data["train"][::2]
    soft = {u: np.eye(3)[y] * 0.8 + 0.2 / 3 for u, _, y in items}

    def provider(epoch):
        batches = shuffled_provider(items, 8)(epoch)
        for b in batches:
            b["soft_target"] = torch.tensor(
                np.stack([soft[u] for u in b["utt_id"]]), dtype=torch.float32
            )
        return batches

    def run():
        return finetune(
            cfg, tiny_classifier(cfg), provider, lambda: make_batches(data["val"], 16), CLASS_NAMES
        )

    first, second = run(), run()
    assert [r.train_loss for r in first.history] == [r.train_loss for r in second.history]
    for key, value in first.best_state_dict.items():
        assert torch.equal(value, second.best_state_dict[key])


def test_resuming_from_an_epoch_checkpoint_ends_with_the_uninterrupted_weights(data, tmp_path):
    """Stop after epoch 1 (state saved to disk and loaded back), resume in a fresh model."""
    from after_ray.store.torch_state import load_training_state, save_training_state

    cfg = FinetuneConfig(epochs=4, batch_size=8, early_stopping_patience=0)
    items = data["train"][::2]
    provider = shuffled_provider(items, 8)

    def val():
        return make_batches(data["val"], 16)

    full = finetune(cfg, tiny_classifier(cfg), provider, val, CLASS_NAMES)
    saved = []

    def keep_epoch_1(epoch, get_state):
        if epoch == 1:
            saved.append(save_training_state(get_state(), tmp_path / "finetune_state.pt"))
            raise KeyboardInterrupt  # the "crash": nothing after epoch 1 runs

    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tiny_classifier(cfg), provider, val, CLASS_NAMES, on_checkpoint=keep_epoch_1)
    state = load_training_state(saved[0])
    assert state["next_epoch"] == 2
    # A differently initialised model: everything must come from the checkpoint.
    resumed = finetune(
        cfg, tiny_classifier(cfg, seed=5), provider, val, CLASS_NAMES, start_state=state
    )
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3]
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in full.history]
    assert resumed.best_epoch == full.best_epoch and resumed.best_val_ua == full.best_val_ua
    for key, value in full.best_state_dict.items():
        assert torch.equal(value, resumed.best_state_dict[key]), key


def test_config_validation_names_the_field():
    assert FinetuneConfig().validate() == []
    problems = FinetuneConfig(lr=0, epochs=0, mask_time_prob=1.5, proj_size=0).validate()
    assert {p.split(":")[0] for p in problems} == {
        "finetune.lr",
        "finetune.epochs",
        "finetune.mask_time_prob",
        "finetune.proj_size",
    }
    built = config_schema.build(
        FinetuneConfig, {"freeze_feature_encoder": True, "pooling": "attentive"}
    )
    assert built.freeze_feature_encoder is True
    with pytest.raises(ConfigError, match="finetune.label_aggregation|label_aggregation"):
        config_schema.build(FinetuneConfig, {"label_aggregation": "mean"})


# --------------------------------------------------------------------------------- feature cache
def test_cached_and_uncached_training_agree_with_a_frozen_cnn(data):
    cfg = FinetuneConfig(batch_size=8, freeze_feature_encoder=True, class_weighted=False)
    model = tiny_classifier(cfg)
    assert model.feature_encoder_frozen
    batches = make_batches(data["train"][::3], 8)
    cache = build_cnn_cache(model, make_batches(data["train"][::3], 3))  # other batching
    labels = {
        u: int(y)
        for b in batches
        for u, y in zip(b["utt_id"], b["label_index"].tolist(), strict=True)
    }
    cached = [
        next(
            iter(
                CachedFeatureBatches(
                    cache, b["utt_id"], label_index=labels, batch_size=8, shuffle=False
                )()
            )
        )
        for b in batches
    ]
    uncached_model, cached_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    # same batch, same seed: the same SpecAugment and dropout draws, hence the same loss
    torch.manual_seed(5)
    loss_audio = F.cross_entropy(
        uncached_model(batches[0]["input_values"], batches[0]["attention_mask"]),
        batches[0]["label_index"],
    )
    torch.manual_seed(5)
    loss_cache = F.cross_entropy(
        cached_model(cnn_features=cached[0]["cnn_features"], frame_mask=cached[0]["frame_mask"]),
        cached[0]["label_index"],
    )
    torch.testing.assert_close(loss_cache, loss_audio, atol=1e-5, rtol=1e-5)
    # a whole epoch of updates lands on the same weights
    for arm, arm_batches in ((uncached_model, batches), (cached_model, cached)):
        optimizer = torch.optim.AdamW([p for p in arm.parameters() if p.requires_grad], lr=cfg.lr)
        torch.manual_seed(6)
        train_one_epoch(
            arm, optimizer, arm_batches, n_classes=3, class_weights=None, cfg=cfg, epoch=0
        )
    for key, value in uncached_model.state_dict().items():
        torch.testing.assert_close(cached_model.state_dict()[key], value, atol=1e-4, rtol=1e-4)


def test_cached_providers_validate_exactly_and_train(data):
    cfg = FinetuneConfig(epochs=2, batch_size=8, freeze_feature_encoder=True, max_duration_s=0.3)
    model = tiny_classifier(cfg)
    val_batches = make_batches(data["val"], 5)
    train, val, stats = make_cached_providers(
        cfg, model, make_batches(data["train"], 16), val_batches
    )
    assert stats["train_utterances"] == 48 and stats["val_utterances"] == 18
    # validation from the cache equals validation from audio (full utterances: exact)
    assert (
        evaluate(model, val(), CLASS_NAMES)["confusion"]
        == evaluate(model, val_batches, CLASS_NAMES)["confusion"]
    )
    crop = int(model.frame_lengths(torch.tensor(4800)))
    assert all(b["cnn_features"].shape[1] <= crop for b in train(0))
    result = finetune(cfg, model, train, val, CLASS_NAMES)
    assert len(result.history) == 2
    assert result.history[1].train_loss < result.history[0].train_loss
    half = FinetuneConfig(freeze_feature_encoder=True, cache_dtype="float16")
    train16, _, stats16 = make_cached_providers(half, model, make_batches(data["train"], 16), [])
    assert {v.dtype for v in train16.cache.values()} == {torch.float16}
    assert stats16["cache_mb"] < 0.6 * stats["cache_mb"]
    unfrozen = tiny_classifier(FinetuneConfig())
    with pytest.raises(ConfigError, match="frozen"):
        make_cached_providers(cfg, unfrozen, [], [])


def test_cached_batches_shuffle_and_crop_per_epoch():
    cache = {f"u{i}": torch.randn(20 + i, 4) for i in range(10)}
    provider = CachedFeatureBatches(
        cache, list(cache), label_index={u: 0 for u in cache}, batch_size=4, crop_frames=12, seed=1
    )
    epoch0, epoch0_again, epoch1 = list(provider(0)), list(provider(0)), list(provider(1))
    assert [len(b["utt_id"]) for b in epoch0] == [4, 4, 2]  # the partial batch is kept
    assert sorted(u for b in epoch0 for u in b["utt_id"]) == sorted(cache)
    assert [b["utt_id"] for b in epoch0] == [b["utt_id"] for b in epoch0_again]
    assert [b["utt_id"] for b in epoch0] != [b["utt_id"] for b in epoch1]
    for batch in epoch0:
        assert batch["cnn_features"].shape[1] == 12 and bool(batch["frame_mask"].all())
        for row, utt in enumerate(batch["utt_id"]):
            full = cache[utt]  # the crop is a contiguous window of the cached utterance
            windows = full.unfold(0, 12, 1).permute(0, 2, 1)
            assert any(torch.equal(w, batch["cnn_features"][row]) for w in windows)


# ------------------------------------------------------------------------------------ scoring
def test_mc_dropout_samples_vary_while_eval_probabilities_are_deterministic(data):
    model = tiny_classifier(FinetuneConfig(proj_size=8))
    batch = make_batches(data["val"], 6)[0]
    first = score_batch(model, batch, mc_samples=5, seed=0)
    second = score_batch(model, batch, mc_samples=5, seed=0)
    other_seed = score_batch(model, batch, mc_samples=5, seed=1)
    assert first["probs"].shape == (6, 3) and first["mc_probs"].shape == (6, 5, 3)
    assert first["embedding"].shape == (6, 64) and first["penultimate"].shape == (6, 8)
    np.testing.assert_array_equal(first["probs"], second["probs"])
    np.testing.assert_array_equal(first["mc_probs"], second["mc_probs"])  # seeded
    assert not np.allclose(first["mc_probs"], other_seed["mc_probs"])
    spread = first["mc_probs"].std(axis=1).max(axis=-1)
    assert (spread > 1e-4).all()  # every utterance's samples differ from each other
    np.testing.assert_allclose(first["mc_probs"].sum(-1), 1.0, atol=1e-5)
    # eval-mode probabilities match the model's own forward pass
    with torch.no_grad():
        logits = model.eval()(batch["input_values"], batch["attention_mask"])
    np.testing.assert_allclose(first["probs"], torch.softmax(logits, -1).numpy(), atol=1e-6)
    assert list(first["utt_id"]) == batch["utt_id"]


def test_average_chunks_weights_by_length_and_keeps_first_appearance_order():
    scores = {
        "utt_id": np.array(["b", "a", "b"], dtype=object),
        "probs": np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]),
        "embedding": np.array([[2.0], [4.0], [6.0]]),
        "mc_probs": np.array([[[1.0, 0.0]], [[0.2, 0.8]], [[0.0, 1.0]]]),
        "lengths": np.array([300, 50, 100]),
    }
    merged = average_chunks(scores)
    assert list(merged["utt_id"]) == ["b", "a"]
    np.testing.assert_allclose(merged["probs"], [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(merged["embedding"], [[3.0], [4.0]])
    np.testing.assert_allclose(merged["mc_probs"], [[[0.75, 0.25]], [[0.2, 0.8]]])
    assert merged["lengths"].tolist() == [400, 50]
