"""Hugging Face export: the audio-classification pipeline reproduces our classifier exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model, pipeline

from after_ray.config.backbone import BackboneConfig
from after_ray.errors import ConfigError
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import SERClassifier
from after_ray.models.export import export_hf

LABELS = ["angry", "happy", "neutral", "sad"]


def _preset_backbone(name: str):
    return load_backbone(BackboneConfig(name_or_path=name, seed=3), for_pretraining=False)


def _group_norm_backbone():
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
    torch.manual_seed(3)
    return Wav2Vec2Model(config)


def _normalise(x: np.ndarray) -> np.ndarray:
    # what our audio pipeline and Wav2Vec2FeatureExtractor(do_normalize=True) both do
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize(
    "make_backbone, proj_size",
    [
        (lambda: _preset_backbone("tiny"), None),
        (lambda: _preset_backbone("tiny-hubert"), 8),
        (lambda: _preset_backbone("tiny-wavlm"), None),
        (_group_norm_backbone, 6),
    ],
    ids=["wav2vec2", "hubert-proj", "wavlm", "wav2vec2-groupnorm-proj"],
)
def test_pipeline_round_trip_gives_our_labels_and_probabilities(
    tmp_path, offline, make_backbone, proj_size
):
    model = SERClassifier(make_backbone(), len(LABELS), proj_size=proj_size, seed=1)
    with torch.no_grad():  # a confident head, so that the ranking is not decided by rounding
        model.classifier.weight.mul_(30.0)
    model.eval()
    out = export_hf(model, LABELS, tmp_path / "export")

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert (out / "model.safetensors").exists()
    extractor = json.loads((out / "preprocessor_config.json").read_text())
    assert extractor["do_normalize"] is True and extractor["return_attention_mask"] is True

    rng = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    wave = (wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, 16000)
    audio, rate = sf.read(tmp_path / "clip.wav", dtype="float32")

    classify = pipeline("audio-classification", model=str(out), device="cpu")
    # a dict input: decoding a path would need ffmpeg, which this machine lacks
    predictions = classify({"raw": audio, "sampling_rate": rate}, top_k=None)
    theirs = {p["label"]: p["score"] for p in predictions}

    with torch.no_grad():
        ours = torch.softmax(model(torch.from_numpy(_normalise(audio))[None]), dim=-1)[0].numpy()
    assert set(theirs) == set(LABELS)
    assert predictions[0]["label"] == LABELS[int(ours.argmax())]
    np.testing.assert_allclose([theirs[name] for name in LABELS], ours, atol=1e-4)
    assert ours.max() > 0.5  # the comparison is not between two near-uniform outputs


def test_attentive_pooling_cannot_be_exported(tmp_path):
    model = SERClassifier(_preset_backbone("tiny"), 2, pooling="attentive")
    with pytest.raises(ConfigError, match="attentive"):
        export_hf(model, ["a", "b"], tmp_path / "x")
    model = SERClassifier(_preset_backbone("tiny"), 2)
    with pytest.raises(ConfigError, match="distinct class names"):
        export_hf(model, ["a", "a"], tmp_path / "x")
