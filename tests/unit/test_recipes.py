"""Training recipes per backbone: picked from the backbone's size and family, filled in under the
user's own values, shown by ``after-ray config``, and a warning when a pre-trained checkpoint is
given the tiny model's values."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest

from after_ray.config.recipes import RECIPES, RecipeWarning, choose_recipe
from after_ray.config.sections import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]


def _config(**sections) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # a test that expects one says so
        return config_from_dict(sections)


def test_the_tiny_recipe_is_the_dataclass_defaults():
    assert asdict(_config()) == asdict(Config())
    assert asdict(_config(backbone={"name_or_path": "tiny-hubert"}).tapt) == asdict(Config().tapt)
    assert RECIPES["tiny"].tapt == {} and RECIPES["tiny"].finetune == {}
    assert Config().finetune.backbone_lr is None  # tiny: one lr for every parameter


@pytest.mark.parametrize(
    ("name", "family", "expected"),
    [
        ("tiny", "auto", "tiny"),
        ("base", "auto", "base-wav2vec2"),
        ("large-wavlm", "auto", "large-wavlm"),
        ("base", "hubert", "base-hubert"),
        ("facebook/wav2vec2-base", "auto", "base-wav2vec2"),
        ("facebook/wav2vec2-large-robust", "auto", "large-wav2vec2"),
        ("facebook/hubert-large-ll60k", "auto", "large-hubert"),
        ("microsoft/wavlm-base-plus", "auto", "base-wavlm"),
        ("someone/my-ser-model", "wavlm", "base-wavlm"),  # size unknown: base assumed
    ],
)
def test_recipe_follows_the_backbone_name(name, family, expected):
    choice = choose_recipe({"name_or_path": name, "family": family})
    assert choice.recipe is not None and choice.recipe.name == expected
    assert choice.pretrained == ("/" in name)


@pytest.mark.parametrize(
    ("model_type", "hidden", "expected"),
    [("wav2vec2", 64, "tiny"), ("hubert", 768, "base-hubert"), ("wavlm", 1024, "large-wavlm")],
)
def test_recipe_of_a_local_checkpoint_comes_from_its_config_json(
    tmp_path, model_type, hidden, expected
):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": model_type, "hidden_size": hidden})
    )
    choice = choose_recipe({"name_or_path": str(tmp_path)})
    assert choice.recipe.name == expected and str(tmp_path) in choice.reason


def test_base_checkpoint_gets_afters_and_fairseqs_values_and_user_keys_win():
    cfg = _config(backbone={"name_or_path": "facebook/wav2vec2-base"})
    t, f = cfg.tapt, cfg.finetune
    assert (t.lr, t.steps, t.warmup_steps, t.lr_schedule) == (1.0e-4, 20_000, 1600, "linear")
    assert (t.mask_prob, t.mask_length, t.num_negatives) == (0.65, 10, 100)
    assert (t.gumbel_temperature_start, t.gumbel_temperature_end) == (0.5, 0.5)
    assert (f.lr, f.epochs, f.freeze_feature_encoder, f.proj_size) == (1.0e-4, 30, True, 256)
    assert f.backbone_lr == 1.0e-5  # SpeechBrain's IEMOCAP recipe: 1e-4 head, 1e-5 wav2vec2
    assert (f.mask_time_prob, f.mask_time_length, f.mask_channel_length) == (0.08, 15, 64)

    # The user's keys win; a shorter TAPT keeps an 8% warm-up unless warmup_steps is set.
    cfg = _config(
        backbone={"name_or_path": "facebook/wav2vec2-base"},
        tapt={"steps": 1000, "mask_prob": 0.5},
        finetune={"epochs": 5},
    )
    assert (cfg.tapt.steps, cfg.tapt.warmup_steps, cfg.tapt.mask_prob) == (1000, 80, 0.5)
    assert (cfg.tapt.lr, cfg.finetune.epochs, cfg.finetune.lr) == (1.0e-4, 5, 1.0e-4)
    cfg = _config(backbone={"name_or_path": "facebook/wav2vec2-base"}, tapt={"warmup_steps": 7})
    assert cfg.tapt.warmup_steps == 7


def test_hubert_and_large_recipes_differ_where_their_sources_do():
    hubert = _config(backbone={"name_or_path": "facebook/hubert-base-ls960"}).tapt
    assert (hubert.mask_prob, hubert.hubert_num_clusters, hubert.hubert_feature_layer) == (
        0.8,
        500,
        6,
    )
    large = _config(backbone={"name_or_path": "facebook/wav2vec2-large-lv60"})
    assert large.tapt.lr == 6.0e-5 and large.tapt.gumbel_temperature_end == 0.1
    assert large.finetune.lr == 5.0e-5 and large.finetune.mask_channel_length == 85
    assert large.finetune.backbone_lr == 5.0e-6


def test_recipe_none_and_a_forced_recipe():
    none = _config(backbone={"name_or_path": "base", "recipe": "none"})
    assert asdict(none.tapt) == asdict(Config().tapt)
    forced = _config(backbone={"name_or_path": "tiny", "recipe": "base-hubert"})
    assert forced.tapt.mask_prob == 0.8 and forced.finetune.lr == 1.0e-4


def test_a_resolved_config_reloads_to_itself():
    import yaml

    cfg = _config(backbone={"name_or_path": "microsoft/wavlm-large"}, tapt={"steps": 500})
    again = _config(**yaml.safe_load(cfg.to_yaml()))
    assert asdict(again) == asdict(cfg)


def test_an_unknown_recipe_is_a_config_error():
    from after_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backbone.recipe: unknown recipe 'small'; choose one"):
        config_from_dict({"backbone": {"recipe": "small"}})


@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"tapt": {"lr": 2.0e-3}}, "tapt.lr: 0.002 destroys a pre-trained representation"),
        ({"tapt": {"mask_length": 2, "num_negatives": 10}}, "tapt.num_negatives: 10"),
        ({"finetune": {"lr": 1.0e-3}}, "finetune.lr: 0.001 overwrites the pre-trained weights"),
        ({"backbone_recipe": "tiny"}, "backbone.recipe: tiny gives the tiny from-scratch"),
        ({"backbone_recipe": "none"}, "its checkpoint's recipe is base-wav2vec2"),
    ],
)
def test_a_checkpoint_given_tiny_values_by_hand_gets_a_warning_that_says_why(sections, says):
    backbone = {"name_or_path": "facebook/wav2vec2-base"}
    if "backbone_recipe" in sections:
        backbone["recipe"] = sections.pop("backbone_recipe")
    with pytest.warns(RecipeWarning, match="is a pre-trained checkpoint") as caught:
        config_from_dict({"backbone": backbone, **sections})
    assert says in str(caught[0].message)


def test_presets_and_tiny_checkpoints_get_no_warning(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2", "hidden_size": 64}))
    _config(backbone={"name_or_path": "base"}, tapt={"lr": 2.0e-3})  # a random-init preset
    _config(backbone={"name_or_path": str(tmp_path)}, tapt={"lr": 2.0e-3})  # a tiny TAPT output


def test_after_ray_config_names_the_recipe_and_prints_its_values(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "after_ray",
            "config",
            "--config",
            str(REPO / "configs" / "iemocap.yaml"),
            f"corpus.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    assert first == "# training recipe: base-wav2vec2, from the name 'facebook/wav2vec2-base'"
    assert "  lr: 0.0001" in rest and "  num_negatives: 100" in rest
    assert "RecipeWarning" not in proc.stderr
