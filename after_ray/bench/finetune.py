"""`after-ray bench finetune`: epoch time with and without the CNN feature cache, in one run.

With the CNN feature encoder frozen (the default for real pre-trained backbones), its output is
the same every epoch, so fine-tuning computes it once per utterance and trains the rest of the
model on the cache. This benchmark builds a small synthesized corpus, loads it in memory, and
times training epochs of the same model on the same batches both ways (interleaved repeats,
fastest of each), for the tiny preset and, with ``--backbone base``, the base shape.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from after_ray.config.finetune import FinetuneConfig
from after_ray.config.sections import Config
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.synth import synthesize_corpus
from after_ray.distributed.worker_audio import InMemoryAudio
from after_ray.models.backbones import load_backbone
from after_ray.models.classifier import SERClassifier, build_classifier
from after_ray.seeding import blake2b_seed
from after_ray.training.finetune import (
    Batch,
    CachedFeatureBatches,
    _utt_ids,
    build_cnn_cache,
    train_one_epoch,
)


def run_finetune_benchmark(
    config: Config, *, utterances: int = 96, presets: tuple[str, ...] = ("tiny", "base")
) -> list[dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize_corpus(
            Path(tmp) / "synth", n_speakers=4, utterances_per_emotion=max(1, utterances // 16)
        )
        rows = load_corpus("csv", root, corpus_name="bench")[:utterances]
        classes = sorted({r["label"] for r in rows})
        audio = InMemoryAudio(rows, config.audio, {c: i for i, c in enumerate(classes)})
        batches = list(audio.eval_batches(batch_size=config.finetune.batch_size))
        for preset in presets:
            backbone_cfg = dataclasses.replace(
                config.backbone, name_or_path=preset, freeze_feature_encoder=True
            )
            model = build_classifier(
                load_backbone(backbone_cfg, for_pretraining=False), len(classes), config.finetune
            )
            result = benchmark_finetune_epoch(config.finetune, model, batches, repeats=2)
            result["backbone"] = preset
            results.append(result)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU"
    print(f"fine-tune epoch time, CNN encoder frozen ({machine}):")
    print(
        "| backbone | utterances | audio (s) | epoch without cache (s) | epoch with cache (s) "
        "| speed-up | cache build (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backbone']} | {int(r['utterances'])} | {r['audio_s']:.0f} | "
            f"{r['uncached_epoch_s']:.2f} | {r['cached_epoch_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['cache_build_s']:.2f} |"
        )
    return results


def benchmark_finetune_epoch(
    cfg: FinetuneConfig,
    model: SERClassifier,
    batches: Sequence[Batch],
    *,
    device: torch.device | str = "cpu",
    epochs: int = 1,
    repeats: int = 3,
    sampling_rate: int = 16000,
) -> dict[str, float]:
    """Wall time of a training epoch on ``batches`` with and without the CNN feature cache.

    Both arms start from copies of ``model`` with the CNN encoder frozen (the cache only applies
    then), train on the same batches in the same order, and run in this one call, interleaved
    ``repeats`` times; each arm reports its fastest repeat (the least disturbed by other load on
    the machine). The cached arm's time excludes building the cache, reported apart as
    ``cache_build_s``; ``amortised_speedup`` includes it over ``epochs`` epochs. Audio decoding
    and resampling, which the cache also saves in a real run, are outside both arms.
    """
    n_classes = model.n_classes
    uncached = copy.deepcopy(model).to(device)
    uncached.freeze_feature_encoder()
    cached = copy.deepcopy(model).to(device)
    cached.freeze_feature_encoder()

    tick = time.perf_counter()
    cache = build_cnn_cache(cached, batches, device=device)
    results: dict[str, float] = {"cache_build_s": time.perf_counter() - tick}
    cached_batches = []
    for batch in batches:
        ids = _utt_ids(batch)
        provider = CachedFeatureBatches(cache, ids, batch_size=len(ids), shuffle=False)
        cached_batch = next(iter(provider(0)))
        for key in ("label_index", "soft_target"):
            if key in batch:
                cached_batch[key] = batch[key]
        cached_batches.append(cached_batch)

    arms = {
        "uncached": (uncached, list(batches)),
        "cached": (cached, cached_batches),
    }
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr)
        for name, (m, _) in arms.items()
    }
    fastest = dict.fromkeys(arms, math.inf)
    for repeat in range(max(1, repeats)):
        for name, (arm_model, arm_batches) in arms.items():
            torch.manual_seed(blake2b_seed(cfg.seed, repeat))
            tick = time.perf_counter()
            for epoch in range(epochs):
                train_one_epoch(
                    arm_model,
                    optimizers[name],
                    arm_batches,
                    n_classes=n_classes,
                    class_weights=None,
                    cfg=cfg,
                    epoch=epoch,
                    device=device,
                )
            fastest[name] = min(fastest[name], (time.perf_counter() - tick) / epochs)
    results["uncached_epoch_s"] = fastest["uncached"]
    results["cached_epoch_s"] = fastest["cached"]
    results["speedup"] = results["uncached_epoch_s"] / results["cached_epoch_s"]
    results["amortised_speedup"] = (epochs * results["uncached_epoch_s"]) / (
        results["cache_build_s"] + epochs * results["cached_epoch_s"]
    )
    results["epochs"] = float(epochs)
    results["utterances"] = float(sum(len(_utt_ids(b)) for b in batches))
    samples = 0.0
    for batch in batches:
        mask = batch.get("attention_mask")
        values = (
            mask if mask is not None else torch.ones_like(torch.as_tensor(batch["input_values"]))
        )
        samples += float(torch.as_tensor(values).sum())
    results["audio_s"] = samples / sampling_rate
    return results
