"""Backbone presets, loading/saving round trips, error messages and the frame arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import HubertModel, Wav2Vec2ForPreTraining, Wav2Vec2Model, WavLMModel

from after_ray.config.backbone import BackboneConfig, TaptConfig
from after_ray.errors import ConfigError
from after_ray.models.backbones import (
    PRESET_MARKER,
    PRESET_NAMES,
    count_parameters,
    encoder_of,
    frames_for_samples,
    load_backbone,
    preset_config,
    preset_parameter_count,
    save_backbone,
)

TINY_PRESETS = {
    "tiny": (Wav2Vec2ForPreTraining, Wav2Vec2Model),
    "tiny-wav2vec2": (Wav2Vec2ForPreTraining, Wav2Vec2Model),
    "tiny-hubert": (HubertModel, HubertModel),
    "tiny-wavlm": (WavLMModel, WavLMModel),
}


def _waveforms(batch: int = 2, samples: int = 12_000, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, samples, generator=generator)
    lengths = torch.tensor([samples] + [samples * 2 // 3] * (batch - 1))
    attention = (torch.arange(samples)[None, :] < lengths[:, None]).long()
    return {"input_values": values * attention, "attention_mask": attention, "lengths": lengths}


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
@pytest.mark.parametrize("for_pretraining", [True, False])
def test_tiny_presets_build_with_the_documented_size(name, for_pretraining):
    model = load_backbone(BackboneConfig(name_or_path=name), for_pretraining=for_pretraining)
    expected = TINY_PRESETS[name][0 if for_pretraining else 1]
    assert type(model) is expected
    assert 80_000 < count_parameters(model) < 150_000  # "~0.1M parameters" (BRIEF)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert list(model.config.conv_dim) == [32] * 5
    batch = _waveforms()
    model.eval()
    with torch.no_grad():
        hidden = encoder_of(model)(batch["input_values"], attention_mask=batch["attention_mask"])
    assert torch.isfinite(hidden.last_hidden_state).all()


def test_large_presets_have_the_published_sizes_without_allocating():
    # Counted on the meta device: the published models are 95.0M (wav2vec2-base with its
    # quantizer), 94.4M (hubert-base), 317M (wav2vec2-large-lv60).
    assert preset_parameter_count("base") == pytest.approx(95.04e6, rel=1e-3)
    assert preset_parameter_count("base-hubert") == pytest.approx(94.37e6, rel=1e-3)
    assert preset_parameter_count("large") == pytest.approx(317.4e6, rel=1e-3)
    assert preset_parameter_count("large-wavlm") == pytest.approx(315.5e6, rel=1e-3)
    for name in PRESET_NAMES:
        config = preset_config(name)
        assert getattr(config, PRESET_MARKER) == name
        assert config.model_type in name or config.model_type == "wav2vec2"


def test_preset_weights_are_deterministic_from_the_seed():
    first = load_backbone(BackboneConfig(name_or_path="tiny", seed=3), for_pretraining=True)
    again = load_backbone(BackboneConfig(name_or_path="tiny", seed=3), for_pretraining=True)
    other = load_backbone(BackboneConfig(name_or_path="tiny", seed=4), for_pretraining=True)
    for (name, a), b in zip(
        first.state_dict().items(),
        again.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, c)
        for a, c in zip(first.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_family_option_turns_a_preset_into_that_family_and_rejects_contradictions():
    model = load_backbone(BackboneConfig(name_or_path="tiny", family="wavlm"), for_pretraining=True)
    assert isinstance(model, WavLMModel)
    with pytest.raises(ConfigError, match="backbone.family"):
        load_backbone(
            BackboneConfig(name_or_path="tiny-hubert", family="wavlm"), for_pretraining=True
        )


def test_pretraining_model_round_trips_as_pretraining_and_as_encoder(tmp_path):
    original = load_backbone(BackboneConfig(name_or_path="tiny", seed=1), for_pretraining=True)
    out = save_backbone(original, tmp_path / "tapt")
    assert (out / "model.safetensors").is_file()
    extractor = json.loads((out / "preprocessor_config.json").read_text())
    assert extractor["sampling_rate"] == 16_000 and extractor["return_attention_mask"] is True

    as_pretraining = load_backbone(BackboneConfig(name_or_path=str(out)), for_pretraining=True)
    as_encoder = load_backbone(BackboneConfig(name_or_path=str(out)), for_pretraining=False)
    assert type(as_pretraining) is Wav2Vec2ForPreTraining and type(as_encoder) is Wav2Vec2Model
    batch = _waveforms()
    mask = torch.zeros(2, frames_for_samples(original, 12_000), dtype=torch.bool)
    mask[:, 3:6] = True
    for model in (original, as_pretraining, as_encoder):
        model.eval()
    with torch.no_grad():
        kwargs = {"attention_mask": batch["attention_mask"], "mask_time_indices": mask}
        ref = original(batch["input_values"], **kwargs)
        again = as_pretraining(batch["input_values"], **kwargs)
        encoded = as_encoder(batch["input_values"], attention_mask=batch["attention_mask"])
        ref_encoded = original.wav2vec2(
            batch["input_values"], attention_mask=batch["attention_mask"]
        )
    assert torch.equal(ref.projected_states, again.projected_states)
    assert torch.equal(ref.projected_quantized_states, again.projected_quantized_states)
    assert torch.equal(encoded.last_hidden_state, ref_encoded.last_hidden_state)


def test_encoder_checkpoint_loads_for_pretraining_with_a_seeded_quantizer(tmp_path):
    encoder = load_backbone(BackboneConfig(name_or_path="tiny", seed=2), for_pretraining=False)
    out = save_backbone(encoder, tmp_path / "encoder")
    first = load_backbone(BackboneConfig(name_or_path=str(out), seed=7), for_pretraining=True)
    second = load_backbone(BackboneConfig(name_or_path=str(out), seed=7), for_pretraining=True)
    assert type(first) is Wav2Vec2ForPreTraining
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the new quantizer comes from the seed, not global RNG
    for name, value in encoder.state_dict().items():
        assert torch.equal(first.wav2vec2.state_dict()[name], value), name


@pytest.mark.parametrize("name", ["tiny-hubert", "tiny-wavlm"])
def test_hubert_and_wavlm_round_trip(tmp_path, name):
    original = load_backbone(BackboneConfig(name_or_path=name, seed=5), for_pretraining=True).eval()
    out = save_backbone(original, tmp_path / name)
    loaded = load_backbone(BackboneConfig(name_or_path=str(out)), for_pretraining=False).eval()
    assert type(loaded) is type(original)
    batch = _waveforms()
    with torch.no_grad():
        a = original(batch["input_values"], attention_mask=batch["attention_mask"])
        b = loaded(batch["input_values"], attention_mask=batch["attention_mask"])
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_save_backbone_replaces_an_existing_directory(tmp_path):
    first = load_backbone(BackboneConfig(name_or_path="tiny", seed=1), for_pretraining=False)
    second = load_backbone(BackboneConfig(name_or_path="tiny", seed=2), for_pretraining=False)
    out = tmp_path / "model"
    save_backbone(first, out)
    save_backbone(second, out)
    loaded = load_backbone(BackboneConfig(name_or_path=str(out)), for_pretraining=False)
    key = "feature_projection.projection.weight"
    assert torch.equal(loaded.state_dict()[key], second.state_dict()[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind


def test_unknown_names_and_bad_directories_give_config_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_backbone(BackboneConfig(name_or_path="tiny-bert"), for_pretraining=False)
    message = str(info.value)
    assert "backbone.name_or_path" in message and "'tiny-bert'" in message
    assert "tiny-hubert" in message and "base" in message  # lists the presets
    with pytest.raises(ConfigError, match="backbone.name_or_path"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path / "missing")), for_pretraining=False)
    with pytest.raises(ConfigError, match="no config.json"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path)), for_pretraining=False)
    out = save_backbone(
        load_backbone(BackboneConfig(name_or_path="tiny-hubert"), for_pretraining=False),
        tmp_path / "hubert",
    )
    with pytest.raises(ConfigError, match="hubert checkpoint"):
        load_backbone(
            BackboneConfig(name_or_path=str(out), family="wav2vec2"), for_pretraining=False
        )


@pytest.mark.parametrize("name", ["tiny", "tiny-hubert", "tiny-wavlm"])
def test_frames_for_samples_matches_the_model_output(name):
    model = load_backbone(BackboneConfig(name_or_path=name), for_pretraining=False).eval()
    for samples in (825, 1_000, 16_000, 23_457):
        with torch.no_grad():
            out = model(torch.randn(1, samples)).last_hidden_state
        assert frames_for_samples(model, samples) == out.shape[1]
        assert frames_for_samples(model.config, samples) == out.shape[1]
    lengths = torch.tensor([16_000, 8_000, 400])
    assert frames_for_samples(model.config, lengths).tolist() == [
        frames_for_samples(model, 16_000),
        frames_for_samples(model, 8_000),
        0,  # shorter than the receptive field: no frame at all
    ]


def test_freeze_auto_spares_presets_and_tapt_but_freezes_real_checkpoints(tmp_path):
    def cnn_trainable(model):
        return any(p.requires_grad for p in encoder_of(model).feature_extractor.parameters())

    preset = load_backbone(BackboneConfig(name_or_path="tiny"), for_pretraining=False)
    assert cnn_trainable(preset)
    # A TAPT output of a preset keeps the preset marker: still never frozen by "auto".
    tapt_dir = save_backbone(preset, tmp_path / "tapt")
    assert cnn_trainable(
        load_backbone(BackboneConfig(name_or_path=str(tapt_dir)), for_pretraining=False)
    )
    # A checkpoint without the marker counts as real pre-trained: frozen for fine-tuning only.
    delattr(preset.config, PRESET_MARKER)
    real_dir = save_backbone(preset, tmp_path / "real")
    assert not cnn_trainable(
        load_backbone(BackboneConfig(name_or_path=str(real_dir)), for_pretraining=False)
    )
    assert cnn_trainable(
        load_backbone(BackboneConfig(name_or_path=str(real_dir)), for_pretraining=True)
    )
    forced = BackboneConfig(name_or_path="tiny", freeze_feature_encoder=True)
    assert not cnn_trainable(load_backbone(forced, for_pretraining=True))


def test_dropout_overrides_reach_the_model_config():
    cfg = BackboneConfig(name_or_path="tiny", hidden_dropout=0.0, layerdrop=0.05)
    model = load_backbone(cfg, for_pretraining=True)
    assert model.config.hidden_dropout == 0.0 and model.config.layerdrop == 0.05


def test_settings_validation_names_the_key_and_the_fix():
    assert BackboneConfig().validate() == [] and TaptConfig().validate() == []
    problems = TaptConfig(steps=0, mask_prob=1.5, warmup_steps=-1, num_negatives=0).validate()
    joined = "\n".join(problems)
    for key in ("tapt.steps", "tapt.mask_prob", "tapt.warmup_steps", "tapt.num_negatives"):
        assert key in joined
    assert BackboneConfig(hidden_dropout=1.2).validate()[0].startswith("backbone.hidden_dropout")
