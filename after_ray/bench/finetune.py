"""`after-ray bench finetune`: epoch time with and without the CNN feature cache, in one run.

With the CNN feature encoder frozen (the default for real pre-trained backbones), its output is
the same every epoch, so fine-tuning computes it once per utterance and trains the rest of the
model on the cache. This benchmark builds a small synthesized corpus, loads it in memory, and
times training epochs of the same model on the same batches both ways (interleaved repeats,
fastest of each), for the tiny preset and, with ``--backbone base``, the base shape.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
from pathlib import Path

import torch

from after_ray.config.sections import Config
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.synth import synthesize_corpus
from after_ray.distributed.worker_audio import InMemoryAudio
from after_ray.models.backbones import load_backbone
from after_ray.training.finetune import benchmark_finetune_epoch, build_classifier


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
