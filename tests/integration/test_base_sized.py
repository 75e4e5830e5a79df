"""A base-sized backbone (wav2vec2-base and HuBERT-base shapes, ~95M parameters, random weights
built from the transformers config) goes through TAPT and fine-tuning with its recipe, the way a
user's run does (``run_tapt`` / ``run_finetune`` on Ray Train in local mode, the config resolved
by ``load_config`` with ``backbone.recipe``), and the TAPT output, saved with
``save_pretrained``, loads back through ``load_backbone``'s ``from_pretrained`` path (the one a
hub id takes) with the same weights and its recipe detected from its ``config.json``.

Only the sizes are cut (3 TAPT steps, 1 fine-tuning epoch of 2 steps, batches of 2, 1.5 s crops
of eight 2.6-5.3 s utterances); every other value is the recipe's. Per-step time and memory of
these models are measured by ``after-ray bench backbone`` (README, "Benchmarks"), which the last
test runs at tiny size.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from after_ray.cli import main
from after_ray.config.backbone import BackboneConfig
from after_ray.config.recipes import RECIPES, choose_recipe
from after_ray.config.sections import load_config
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.synth import synthesize_corpus
from after_ray.distributed.train import run_finetune, run_tapt
from after_ray.models.backbones import load_backbone, preset_parameter_count
from after_ray.training import tapt as tapt_module

# (preset, recipe, family)
BASE_MODELS = [("base", "base-wav2vec2", "wav2vec2"), ("base-hubert", "base-hubert", "hubert")]
CROP_S = 1.5
SIZES = [
    "tapt.steps=3",
    "tapt.batch_size=2",
    "finetune.epochs=1",
    "finetune.batch_size=2",
    f"finetune.max_duration_s={CROP_S}",
    f"audio.train_crop_s={CROP_S}",
    "ray.num_workers=0",
]
# The recipe values that must reach the loops unchanged (sizes apart).
RECIPE_TAPT_KEYS = ("lr", "mask_prob", "mask_length", "lr_schedule")
RECIPE_FINETUNE_KEYS = (
    "lr",
    "freeze_feature_encoder",
    "proj_size",
    "mask_time_prob",
    "mask_time_length",
    "mask_channel_prob",
    "mask_channel_length",
)


@pytest.fixture
def one_torch_thread():
    """What the worker loop sets for ray.cpus_per_worker: 1 (and sets again in local mode); the
    caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two synthesized speakers x four emotions, one utterance each (2.6-5.3 s)."""
    import soundfile as sf

    root = synthesize_corpus(
        tmp_path_factory.mktemp("c") / "synth", n_speakers=2, utterances_per_emotion=1, seed=5
    )
    rows = load_corpus("csv", root, corpus_name="b")
    for row in rows:
        row["duration_s"] = sf.info(row["path"]).duration
    return rows


def test_base_presets_have_the_published_parameter_counts():
    """wav2vec2-base: 94.4M in the encoder, 95.0M with the quantizer and projection heads that
    TAPT trains; HuBERT-base: 94.4M (the same encoder; its TAPT head is ours, built apart)."""
    encoder = preset_parameter_count("base", for_pretraining=False)
    pretraining = preset_parameter_count("base", for_pretraining=True)
    hubert = preset_parameter_count("base-hubert", for_pretraining=False)
    assert 94.0e6 < encoder < 95.0e6
    assert 94.8e6 < pretraining < 95.5e6 and pretraining - encoder > 0.5e6
    assert 94.0e6 < hubert < 95.0e6
    assert preset_parameter_count("base-hubert", for_pretraining=True) == hubert


def _spy(monkeypatch, name: str, calls: list) -> None:
    """Record every call of the TAPT loop's ``name`` (args and result), then return the result."""
    real = getattr(tapt_module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(tapt_module, name, spy)


def _spy_head(monkeypatch, heads: list) -> None:
    """Record the head (every weight outside the backbone) of the classifier the fine-tuning
    loop builds, as built."""
    from after_ray.models import classifier

    real = classifier.build_classifier

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        state = model.state_dict()
        heads.append(
            {k: v.numpy().copy() for k, v in state.items() if not k.startswith("backbone.")}
        )
        return model

    monkeypatch.setattr(classifier, "build_classifier", spy)


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


def _expected_share(prob: float, span: int, min_masks: int, length: int) -> float:
    """Expected masked share of an utterance of ``length`` frames under Hugging Face's span
    masking (``floor(prob * length / span + u)`` distinct starts, u ~ U[0, 1), at least
    ``min_masks``): exact, from the number of starts covering each frame."""
    starts = length - span + 1
    spans = prob * length / span
    low = math.floor(spans)
    share = 0.0
    for n, weight in ((low, 1.0 - (spans - low)), (low + 1, spans - low)):
        n = min(max(n, min_masks), starts)
        for t in range(length):
            covering = min(t, starts - 1) - max(0, t - span + 1) + 1
            share += weight * (1.0 - math.comb(starts - covering, n) / math.comb(starts, n))
    return share / length


def _masked_runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of masked frames in a 1-D bool mask."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).to(torch.int8)
    edges = torch.diff(padded).nonzero().flatten().tolist()
    return [end - start for start, end in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("preset", "recipe", "family"), BASE_MODELS, ids=["wav2vec2", "hubert"])
def test_base_model_runs_tapt_and_finetuning_with_its_recipe(
    preset, recipe, family, corpus, tmp_path, monkeypatch, one_torch_thread
):
    config = load_config(
        None, [f"backbone.name_or_path={preset}", f"backbone.recipe={recipe}", *SIZES]
    )
    for key in RECIPE_TAPT_KEYS:
        assert getattr(config.tapt, key) == RECIPES[recipe].tapt[key], key
    for key in RECIPE_FINETUNE_KEYS:
        assert getattr(config.finetune, key) == RECIPES[recipe].finetune[key], key
    assert config.tapt.lr == 1.0e-4 and config.finetune.freeze_feature_encoder is True

    # ---------------------------------------------------------------- TAPT: 3 steps
    pretraining = family == "wav2vec2"  # HuBERT TAPT trains the bare encoder + our head
    initial = {
        k: v.numpy().copy()
        for k, v in load_backbone(config.backbone, for_pretraining=True).state_dict().items()
    }
    masks: list = []
    negatives: list = []
    _spy(monkeypatch, "compute_span_mask", masks)
    _spy(monkeypatch, "sample_negatives", negatives)
    tapt_dir = tmp_path / "tapt"
    summary = run_tapt(
        rows=corpus,
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
        storage_path=tmp_path / "ray",
        name="tapt",
        out_dir=tapt_dir,
    )
    monkeypatch.undo()
    assert summary["steps"] == 3 and len(summary["loss_history"]) == 3
    assert all(math.isfinite(x) for x in summary["loss_history"]), summary["loss_history"]
    if not pretraining:
        # cross-entropy over the recipe's 500 k-means targets starts near ln(500) = 6.2
        assert all(4.0 < x < 9.0 for x in summary["loss_history"])

    # The recipe's masking reached every step: 0.65 x 10 (wav2vec2) / 0.8 x 10 (HuBERT).
    mask_prob = RECIPES[recipe].tapt["mask_prob"]
    assert len(masks) == 3
    masked = total = 0
    for args, _, mask in masks:
        lengths, frames, prob, span = args[0], args[1], args[2], args[3]
        assert (prob, span) == (mask_prob, 10)
        assert mask.shape == (2, frames) and int(lengths.max()) == frames == 74  # 1.5 s crops
        for row, length in zip(mask, lengths.tolist(), strict=True):
            assert not row[length:].any()
            # Spans of 10 frames (overlapping ones merge): no masked run is shorter.
            assert min(_masked_runs(row[:length])) >= 10
        masked += int(mask.sum())
        total += int(lengths.sum())
    share = masked / total
    # Spans overlap, so the masked share is below mask_prob: 0.50 expected for 0.65 x 10 over
    # 74 frames, 0.58 for 0.8 x 10 (the tiny recipe's 0.3 x 2 would give 0.28); over 6
    # utterances the share's 99% range is +-0.07.
    expected = _expected_share(mask_prob, 10, config.tapt.min_masks, 74)
    assert abs(share - expected) < 0.1, (share, expected)
    if pretraining:
        assert len(negatives) == 3
        for args, _, drawn in negatives:
            assert args[2] == 100 and drawn.shape == (*args[0].shape, 100)
    else:
        assert negatives == []  # masked prediction draws no negatives

    # Every tensor trained (TAPT trains the CNN too: freeze_feature_encoder auto = not in TAPT).
    saved = load_file(str(tapt_dir / "model.safetensors"))
    encoder_prefix = "wav2vec2." if pretraining else ""
    assert saved.keys() == initial.keys()
    assert all(np.isfinite(v).all() for v in saved.values())
    changed = _changed(initial, saved)
    assert not set(initial) - changed, sorted(set(initial) - changed)[:10]

    # ------------------------------------------------- the Hugging Face directory loads back
    choice = choose_recipe({"name_or_path": str(tapt_dir)})
    assert choice.recipe.name == recipe and "config.json" in choice.reason, choice.reason
    loaded = load_backbone(
        BackboneConfig(name_or_path=str(tapt_dir)), for_pretraining=pretraining
    ).state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    low, high = (94.8e6, 95.5e6) if pretraining else (94.0e6, 95.0e6)
    assert low < sum(v.numel() for v in loaded.values()) < high
    del loaded, initial

    # ---------------------------------------------- fine-tuning: 1 epoch, 4 utterances
    # The TAPT directory as the backbone, recipe auto: detected from its config.json.
    ft_config = load_config(None, [f"backbone.name_or_path={tapt_dir}", *SIZES])
    for key in RECIPE_FINETUNE_KEYS:
        assert getattr(ft_config.finetune, key) == RECIPES[recipe].finetune[key], key
    train = [r for r in corpus if r["speaker"].endswith("spk01")]  # one per emotion
    val = [r for r in corpus if r["speaker"].endswith("spk02")][:2]
    classes = sorted({r["label"] for r in corpus})
    heads: list = []
    _spy_head(monkeypatch, heads)
    ft = run_finetune(
        train_rows=train,
        val_rows=val,
        class_names=classes,
        finetune_cfg=ft_config.finetune,
        backbone=ft_config.backbone,
        audio=ft_config.audio,
        ray_cfg=ft_config.ray,
        storage_path=tmp_path / "ray-ft",
        name="ft",
        out_dir=tmp_path / "classifier",
    )
    monkeypatch.undo()
    (epoch,) = ft["history"]
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val_loss"]), epoch
    tuned = load_file(str(tmp_path / "classifier" / "classifier.safetensors"))
    assert all(np.isfinite(v).all() for v in tuned.values())
    backbone_keys = {k for k in tuned if k.startswith("backbone.")}
    cnn = {k for k in backbone_keys if k.startswith("backbone.feature_extractor.")}
    assert len(cnn) >= 8  # 7 conv layers (+ the first one's group norm)
    # The CNN is frozen (recipe): bit-identical to the TAPT output it was loaded from.
    for key in cnn:
        source = encoder_prefix + key.removeprefix("backbone.")
        np.testing.assert_array_equal(tuned[key], saved[source], err_msg=key)
    # Everything else trained: the transformer, the feature projection, and the new head.
    before = {k: saved[encoder_prefix + k.removeprefix("backbone.")] for k in backbone_keys - cnn}
    unchanged = set(before) - _changed(before, {k: tuned[k] for k in before})
    # masked_spec_embed is only read where SpecAugment masks frames with it.
    assert unchanged <= {"backbone.masked_spec_embed"}, sorted(unchanged)[:10]
    (head,) = heads  # the new head as built, before training
    assert head.keys() == set(tuned) - backbone_keys
    assert _changed(head, {k: tuned[k] for k in head}) == set(head)
    assert any(v.shape == (256, 768) for v in head.values()), "the recipe's 256-wide projector"


def test_bench_backbone_prints_a_row_per_model_with_positive_numbers(capsys):
    """``after-ray bench backbone`` at tiny size: the table has the tiny row, every number > 0."""
    assert main(["bench", "backbone", "--backbones", "tiny", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    numbers = [float(x.replace(",", "")) for c in cells[1:] for x in re.findall(r"[\d.,]+", c)]
    assert len(numbers) >= 5 and all(x > 0 for x in numbers), cells
    assert "per-step time" in out and "peak RSS" in out
