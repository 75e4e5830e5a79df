"""TAPT and fine-tuning on Ray Train: a real 2-worker DDP run that loses a worker and resumes
from its checkpoint to the same weights, exact resume of a killed TAPT driver, a fine-tuning
worker killed mid-epoch that resumes from its epoch checkpoint, and fine-tuning that learns the
synthesized emotions (better than chance on held-out speakers).

The 2-worker runs prove that the workers are real from what each rank wrote
(``diagnostics_dir``, see ``after_ray.distributed.train.WorkerDiagnostics``): world size 2 seen
inside the workers, ranks {0, 1}, disjoint shards that make up the data, and weights identical
on both ranks after every step checked (and different from the initial ones). 2-worker
fine-tuning equals the 1-worker run with twice the batch, an uneven split (one rank with a
batch more) does not hang, and a TAPT batch with nothing to mask on one rank only keeps the
ranks in step."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from after_ray import faults
from after_ray.config.sections import load_config
from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.synth import synthesize_corpus
from after_ray.distributed.train import run_finetune, run_tapt

REPO = Path(__file__).resolve().parents[2]


def rows_with_durations(root: Path) -> list[dict]:
    import soundfile as sf

    rows = load_corpus("csv", root, corpus_name="t")
    for row in rows:
        row["duration_s"] = sf.info(row["path"]).duration
    return rows


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = synthesize_corpus(
        tmp_path_factory.mktemp("c") / "synth",
        n_speakers=8,
        utterances_per_emotion=4,
        separation=2.0,
        seed=5,
    )
    return rows_with_durations(root)


TAPT_OVERRIDES = ["tapt.warmup_steps=1", "tapt.checkpoint_every=2", "tapt.batch_size=4"]


def tapt_config(steps: int, *extra: str):
    return load_config(None, [f"tapt.steps={steps}", *TAPT_OVERRIDES, *extra])


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(model_dir / "model.safetensors"))


def weights_of(classifier_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(classifier_dir / "classifier.safetensors"))


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Bit-identical: the same tensors with the same values."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def rank_records(diagnostics_dir: Path, world: int = 2) -> list[dict]:
    """What each rank of a run wrote (``WorkerDiagnostics``), indexed by rank."""
    assert sorted(p.name for p in diagnostics_dir.iterdir()) == [
        f"rank-{r}.json" for r in range(world)
    ]
    return [json.loads((diagnostics_dir / f"rank-{r}.json").read_text()) for r in range(world)]


def assert_real_workers(records: list[dict], utt_ids: list[str]) -> None:
    """Two real DDP workers: world size 2 inside both (Ray Train's and torch.distributed's),
    ranks 0 and 1, non-empty disjoint shards whose union is ``utt_ids`` (each rank draws all of
    its shard, once, in every epoch it starts: the tests use whole epochs), and weights identical
    on both ranks after every step recorded, different from the initial ones."""
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["torch_world_size"] == 2 for r in records)
    shards = []
    for record in records:
        epochs = [[u for batch in record["batches"][e] for u in batch] for e in record["batches"]]
        assert epochs and epochs[0], record["rank"]
        assert all(sorted(drawn) == sorted(set(epochs[0])) for drawn in epochs), record["rank"]
        shards.append(set(epochs[0]))
    assert not shards[0] & shards[1]
    assert sorted(shards[0] | shards[1]) == sorted(utt_ids)
    digests = [r["digests"] for r in records]
    assert digests[0] == digests[1]
    assert len(digests[0]) >= 3  # initial, at least one step, final
    initial = digests[0]["initial"]
    assert all(v != initial for k, v in digests[0].items() if k != "initial")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_worker_ddp_tapt_survives_a_worker_killed_mid_run(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """A real 2-worker DDP run (world size 2 in the workers, disjoint shards, the same weights on
    both ranks at every checkpoint); then the same run with one worker SIGKILLed once after step
    5: FailureConfig restarts the group, it resumes from the step-4 checkpoint, same weights.
    (The step-4 checkpoint is the only one before the kill: when Ray has not registered it yet,
    the run resumes from the local copy, ``CheckpointWriter``, so the resume point is fixed.)

    17 rows: rank 0 has 9 (3 batches of 4 per epoch), rank 1 has 8 (2), so at step 4 the ranks
    are at different places in their data (epoch 1, batch 1 and epoch 1, batch 2). Each must
    resume at its own (the checkpoint's ``rank_positions``), not rank 0's, to end with the
    weights of the uninterrupted run.
    """
    config = tapt_config(6, "tapt.checkpoint_every=4")
    ray_cfg = dataclasses.replace(config.ray, num_workers=2, max_failures=1)
    rows = small_corpus[:17]
    common = dict(
        rows=rows,
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=ray_cfg,
    )
    summary = run_tapt(
        **common,
        storage_path=tmp_path / "ray",
        name="ddp",
        out_dir=tmp_path / "model",
        diagnostics_dir=tmp_path / "diagnostics",
    )
    assert summary["steps"] == 6 and len(summary["loss_history"]) == 6
    assert all(np.isfinite(summary["loss_history"])) and summary["resumed_from_step"] == 0
    trained = weights(tmp_path / "model")
    assert trained and all(np.isfinite(v).all() for v in trained.values())
    records = rank_records(tmp_path / "diagnostics")
    assert_real_workers(records, [r["utt_id"] for r in rows])
    assert set(records[0]["digests"]) == {"initial", "4", "6", "final"}
    # 6 steps of 4-utterance batches: rank 0 drew 3 + 3, rank 1 drew 2 + 2 + 2.
    assert [len(records[0]["batches"][e]) for e in ("0", "1")] == [3, 3]
    assert [len(records[1]["batches"][e]) for e in ("0", "1", "2")] == [2, 2, 2]

    marker = tmp_path / "worker-killed"
    monkeypatch.setenv(faults.ENV, "tapt_step@5")  # after the 5th batch, one worker only
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    summary = run_tapt(
        **common,
        storage_path=tmp_path / "ray-killed",
        name="ddp",
        out_dir=tmp_path / "model-killed",
    )
    assert marker.exists()  # a worker really died
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 4
    assert_same_weights(trained, weights(tmp_path / "model-killed"))


# Two plain torch.distributed (gloo) processes run ``tapt_loop`` on batches of their own; rank 1's
# second batch is two 1000-sample utterances (1 encoder frame each: nothing to mask).
TAPT_SKIP_WORKER = textwrap.dedent(
    """
    import datetime, json, sys
    import numpy as np, torch
    from after_ray.config.sections import load_config
    from after_ray.distributed.train import state_digest
    from after_ray.models.backbones import load_backbone
    from after_ray.training.tapt import tapt_loop

    rank, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    cfg = load_config(None, ["tapt.steps=3", "tapt.warmup_steps=1", "tapt.checkpoint_every=1"])

    def batch(samples, seed):
        x = np.random.default_rng(seed).standard_normal((2, samples)).astype(np.float32)
        return {"input_values": torch.tensor(x), "attention_mask": torch.ones(2, samples)}

    batches = [batch(16000, 10 * rank + i) for i in range(4)]
    if rank == 1:
        batches[1] = batch(1000, 99)
    model = torch.nn.parallel.DistributedDataParallel(
        load_backbone(cfg.backbone, for_pretraining=True), find_unused_parameters=True
    )
    digests = {"initial": state_digest(model.module.state_dict())}
    summary = tapt_loop(
        cfg.tapt,
        model,
        batches,
        on_checkpoint=lambda step, state: digests.update({str(step): state_digest(state["model"])}),
        device="cpu",
    )
    state = summary["state"]
    record = {
        "digests": digests,
        "steps": summary["steps"],
        "skipped": summary["skipped_batches"],
        "position": [state.epoch, state.batch_in_epoch],
    }
    with open(f"{out}/rank-{rank}.json", "w") as handle:
        json.dump(record, handle)
    torch.distributed.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(script: str, out: Path, what: str, timeout: float = 120) -> list[dict]:
    """Run ``script`` as ranks 0 and 1 of a gloo process group (argv: rank, ``out``); each
    writes ``out/rank-<rank>.json``, returned by rank. Fails the test when they do not both end
    within ``timeout`` seconds (``what``: the hang to name)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), str(out)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two ranks hung: {what}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(300)
def test_a_tapt_batch_with_nothing_to_mask_on_one_rank_only_keeps_the_ranks_in_step(tmp_path):
    """DDP all-reduces gradients in every backward pass: a rank that skipped a step while the
    other stepped would wait for it forever. ``tapt_loop`` skips a batch without masked frames
    before its forward pass and counts only the steps it takes, so the rank that skipped takes
    its step on the next batch: both take 3 steps, the weights stay identical after every one,
    and only the skipping rank is a batch further on in its data (which is why a TAPT
    checkpoint keeps every rank's place). The two processes must end within 120 s."""
    records = run_two_ranks(TAPT_SKIP_WORKER, tmp_path, "a skipped TAPT batch")
    assert [r["skipped"] for r in records] == [0, 1]
    assert [r["steps"] for r in records] == [3, 3]
    assert [r["position"] for r in records] == [[0, 3], [0, 4]]
    assert records[0]["digests"] == records[1]["digests"]
    assert set(records[0]["digests"]) == {"initial", "1", "2", "3"}
    assert len(set(records[0]["digests"].values())) == 4  # every step changed the weights


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tapt_killed_after_first_checkpoint_resumes_to_the_same_weights(
    ray_session, small_corpus, tmp_path
):
    # num_workers=0: the loop runs in the driver, so the failpoint kills the whole run (a lost
    # driver or machine), not just a worker that Ray Train would restart. 300 steps, killed at
    # step 100 in another process: long enough that float drift between processes, which once
    # parted two runs within 150 steps, would show in the weights.
    extra = ["ray.num_workers=0", "tapt.checkpoint_every=100"]
    overrides = [*TAPT_OVERRIDES, "tapt.steps=300", *extra]
    config = tapt_config(300, *extra)
    rows = small_corpus[:24]
    common = dict(
        rows=rows,
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
    )
    run_tapt(
        **common, storage_path=tmp_path / "ray-a", name="t", out_dir=tmp_path / "uninterrupted"
    )

    # The same TAPT in a subprocess that SIGKILLs itself right after its first checkpoint.
    args = json.dumps(
        {
            "rows": rows,
            "storage": str(tmp_path / "ray-b"),
            "out": str(tmp_path / "resumed"),
            "overrides": overrides,
        }
    )
    script = (
        "import json, sys; from after_ray.config.sections import load_config; "
        "from after_ray.distributed.train import run_tapt; a = json.loads(sys.argv[1]); "
        "c = load_config(None, a['overrides']); "
        "run_tapt(rows=a['rows'], tapt=c.tapt, backbone=c.backbone, audio=c.audio, "
        "ray_cfg=c.ray, storage_path=a['storage'], name='t', out_dir=a['out'])"
    )
    env = {**os.environ, "AFTER_RAY_FAILPOINT": "tapt_checkpoint", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()
    summary = run_tapt(
        **common, storage_path=tmp_path / "ray-b", name="t", out_dir=tmp_path / "resumed"
    )
    assert summary["steps"] == 300 and summary["resumed_from_step"] == 100
    assert_same_weights(weights(tmp_path / "uninterrupted"), weights(tmp_path / "resumed"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finetuning_the_tiny_preset_beats_chance_on_held_out_speakers(
    ray_session, small_corpus, tmp_path
):
    from after_ray.distributed.worker_audio import InMemoryAudio
    from after_ray.metrics import classification_report
    from after_ray.models.classifier_io import load_classifier
    from after_ray.training.scoring import score_batch

    speakers = sorted({r["speaker"] for r in small_corpus})
    test_speakers, val_speakers = set(speakers[:2]), {speakers[2]}
    train = [r for r in small_corpus if r["speaker"] not in test_speakers | val_speakers]
    val = [r for r in small_corpus if r["speaker"] in val_speakers]
    test = [r for r in small_corpus if r["speaker"] in test_speakers]
    classes = ["angry", "happy", "neutral", "sad"]
    config = load_config(
        None, ["finetune.epochs=12", "finetune.early_stopping_patience=0", "finetune.batch_size=8"]
    )
    summary = run_finetune(
        train_rows=train,
        val_rows=val,
        class_names=classes,
        finetune_cfg=config.finetune,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
        storage_path=tmp_path / "ray",
        name="ft",
        out_dir=tmp_path / "model",
    )
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    model, names = load_classifier(tmp_path / "model")
    assert names == classes
    audio = InMemoryAudio(test, config.audio, {c: i for i, c in enumerate(classes)})
    y_true, y_pred = [], []
    for batch in audio.eval_batches(batch_size=16):
        out = score_batch(model, batch, mc_samples=0, seed=0)
        y_true += batch["label_index"].tolist()
        y_pred += out["probs"].argmax(axis=1).tolist()
    report = classification_report(np.array(y_true), np.array(y_pred), classes)
    assert report["ua"] > 0.40, report  # chance is 0.25 on these 4 balanced classes


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_finetune_worker_killed_mid_epoch_resumes_from_its_epoch_checkpoint(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """One Ray Train worker (its own process) is SIGKILLed in epoch 2; FailureConfig restarts
    it, it continues from the epoch-1 checkpoint and ends with the weights of an uninterrupted
    run (the same loop run in the driver: Ray Train's local mode, world size 1 as well)."""
    classes = ["angry", "happy", "neutral", "sad"]
    speakers = sorted({r["speaker"] for r in small_corpus})
    train = [r for r in small_corpus if r["speaker"] in speakers[:3]]
    val = [r for r in small_corpus if r["speaker"] == speakers[3]]
    config = load_config(
        None, ["finetune.epochs=3", "finetune.early_stopping_patience=0", "finetune.batch_size=8"]
    )
    steps_per_epoch = -(-len(train) // 8)

    def fine_tune(num_workers: int, name: str) -> dict:
        ray_cfg = dataclasses.replace(config.ray, num_workers=num_workers, max_failures=1)
        return run_finetune(
            train_rows=train,
            val_rows=val,
            class_names=classes,
            finetune_cfg=config.finetune,
            backbone=config.backbone,
            audio=config.audio,
            ray_cfg=ray_cfg,
            storage_path=tmp_path / "ray",
            name=name,
            out_dir=tmp_path / name,
        )

    reference = fine_tune(0, "local")
    marker = tmp_path / "worker-killed"
    # Mid epoch 2 (the second epoch, index 1): after its second batch.
    monkeypatch.setenv(faults.ENV, f"finetune_step@{steps_per_epoch + 2}")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    summary = fine_tune(1, "worker")
    assert marker.exists()
    assert summary["resumed_from_epoch"] == 1
    assert [h["train_loss"] for h in summary["history"]] == [
        h["train_loss"] for h in reference["history"]
    ]
    assert_same_weights(weights_of(tmp_path / "local"), weights_of(tmp_path / "worker"))


# Ranks 0 and 1 of a gloo group run ``train_one_epoch`` on a DDP-wrapped linear classifier:
# rank 0 has 3 labeled batches; rank 1 has 2, the first with no labeled row (label_index -1).
FINETUNE_UNEVEN_WORKER = textwrap.dedent(
    """
    import datetime, json, sys
    import torch
    from after_ray.config.sections import load_config
    from after_ray.distributed.train import state_digest
    from after_ray.training.finetune import train_one_epoch

    rank, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(6, 4)

        def forward(self, input_values, attention_mask=None):
            return self.out(input_values)

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Linear())
    generator = torch.Generator().manual_seed(rank)

    def batch(n, labeled=True):
        labels = torch.randint(0, 4, (n,), generator=generator) if labeled else torch.full((n,), -1)
        return {
            "input_values": torch.randn(n, 6, generator=generator),
            "label_index": labels,
            "utt_id": [f"r{rank}-{i}" for i in range(n)],
        }

    batches = [batch(4), batch(4), batch(2)] if rank == 0 else [batch(4, labeled=False), batch(4)]
    cfg = load_config(None, []).finetune
    loss = train_one_epoch(
        model,
        torch.optim.AdamW(model.parameters(), lr=0.01),
        batches,
        n_classes=4,
        class_weights=None,
        cfg=cfg,
        epoch=0,
    )
    with open(f"{out}/rank-{rank}.json", "w") as handle:
        json.dump({"loss": loss, "digest": state_digest(model.module.state_dict())}, handle)
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.timeout(300)
def test_finetuning_ranks_with_uneven_or_unlabeled_batches_step_together(tmp_path):
    """``train_one_epoch`` under DDP, rank 0 with a batch more than rank 1, and rank 1's first
    batch with nothing labeled: both ranks take 2 steps (rank 1 joins the first all-reduce with a
    zero loss, rank 0's third batch is left out), end with identical weights, and return the same
    epoch loss: the mean over both ranks' labeled items. The two processes must end in 120 s."""
    records = run_two_ranks(FINETUNE_UNEVEN_WORKER, tmp_path, "uneven fine-tuning batches")
    assert records[0]["digest"] == records[1]["digest"]
    assert records[0]["loss"] == records[1]["loss"] and np.isfinite(records[0]["loss"])


CLASSES = ["angry", "happy", "neutral", "sad"]
# Fine-tuning whose steps do not depend on how a batch is cut: no dropout or SpecAugment, an
# unweighted loss (a batch's mean), and frozen-CNN features cropped to 0.5 s (every utterance
# is longer, so no batch is padded; the crop is drawn from (seed, epoch, utt_id) alone).
EXACT_FINETUNE = [
    "finetune.early_stopping_patience=0",
    "finetune.lr=0.003",
    "finetune.freeze_feature_encoder=true",
    "finetune.max_duration_s=0.5",
    "finetune.class_weighted=false",
    "finetune.head_dropout=0",
    "finetune.mask_time_prob=0",
    "finetune.mask_channel_prob=0",
    "backbone.hidden_dropout=0",
    "backbone.attention_dropout=0",
    "backbone.activation_dropout=0",
    "backbone.feat_proj_dropout=0",
    "backbone.layerdrop=0",
]


def fine_tune_on(train, val, tmp_path, name, num_workers, *overrides, diagnostics=False):
    config = load_config(None, list(overrides))
    return run_finetune(
        train_rows=train,
        val_rows=val,
        class_names=CLASSES,
        finetune_cfg=config.finetune,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=dataclasses.replace(config.ray, num_workers=num_workers, max_failures=0),
        storage_path=tmp_path / "ray",
        name=name,
        out_dir=tmp_path / name,
        diagnostics_dir=tmp_path / f"diagnostics-{name}" if diagnostics else None,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_ddp_finetuning_equals_one_worker_with_twice_the_batch(
    ray_session, small_corpus, tmp_path
):
    """2 workers x batch 16 against 1 worker (local mode: world size 1) x batch 32 on 32
    utterances: each rank's shard is
    one batch, so both runs take the same 6 optimizer steps on the same utterances, and DDP's
    mean of the two ranks' gradients is the 32-batch gradient. Measured: train and validation
    losses within 1.2e-7 of each other, weights within 1.2e-5 (a 1-worker run with batch 16,
    different steps, was 0.1 away in loss). Tolerance: losses 1e-4, weights 1e-3 absolute
    (float summation order, which AdamW can amplify where a gradient is near zero)."""
    speakers = sorted({r["speaker"] for r in small_corpus})
    train = [r for r in small_corpus if r["speaker"] in speakers[:2]]
    val = [r for r in small_corpus if r["speaker"] == speakers[2]]
    assert len(train) == 32
    one = fine_tune_on(
        train,
        val,
        tmp_path,
        "one",
        0,
        "finetune.epochs=6",
        "finetune.batch_size=32",
        *EXACT_FINETUNE,
    )
    two = fine_tune_on(
        train,
        val,
        tmp_path,
        "two",
        2,
        "finetune.epochs=6",
        "finetune.batch_size=16",
        *EXACT_FINETUNE,
        diagnostics=True,
    )
    records = rank_records(tmp_path / "diagnostics-two")
    assert_real_workers(records, [r["utt_id"] for r in train])
    assert set(records[0]["digests"]) == {"initial", "final", *map(str, range(6))}
    assert all(len(r["batches"][e]) == 1 for r in records for e in r["batches"])

    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(
            [h[key] for h in two["history"]], [h[key] for h in one["history"]], atol=1e-4, rtol=0
        )
    losses = [h["train_loss"] for h in one["history"]]
    assert losses[-1] < losses[0] - 0.05  # it trained: the comparison is not of two idle runs
    assert two["best_epoch"] == one["best_epoch"]
    reference = weights_of(tmp_path / "one")
    got = weights_of(tmp_path / "two")
    assert got.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-3, rtol=0, err_msg=key)


@pytest.mark.slow
# The thread method: the default (SIGALRM) cannot interrupt a driver blocked in Ray's ray.get,
# so a hang would outlive the timeout. On a hang the thread method prints every thread's stack
# and ends the pytest process: a loud failure, not a CI job that sits for 30 minutes.
@pytest.mark.timeout(180, method="thread")
def test_two_worker_finetuning_on_an_uneven_split_does_not_hang(
    ray_session, small_corpus, tmp_path
):
    """17 utterances, batch 8: rank 0 has 9 (2 batches), rank 1 has 8 (1 batch). Rank 0's second
    backward pass once waited in DDP's gradient all-reduce for a rank that had gone on to
    validation and Ray Train's report barrier: a deadlock until the process group's 30-minute
    timeout. Now the ranks agree before each step and stop together (rank 0's extra batch is
    drawn and left out); the run must end within the test's timeout (about 25 s when it does
    not hang), in step (the same weights on both ranks after each epoch)."""
    speakers = sorted({r["speaker"] for r in small_corpus})
    train = [r for r in small_corpus if r["speaker"] in speakers[:2]][:17]
    val = [r for r in small_corpus if r["speaker"] == speakers[2]]
    summary = fine_tune_on(
        train,
        val,
        tmp_path,
        "uneven",
        2,
        "finetune.epochs=2",
        "finetune.batch_size=8",
        "finetune.early_stopping_patience=0",
        diagnostics=True,
    )
    assert len(summary["history"]) == 2
    assert all(np.isfinite(h["train_loss"]) for h in summary["history"])
    records = rank_records(tmp_path / "diagnostics-uneven")
    assert_real_workers(records, [r["utt_id"] for r in train])
    assert [[len(r["batches"][e]) for e in ("0", "1")] for r in records] == [[2, 2], [1, 1]]
    assert set(records[0]["digests"]) == {"initial", "0", "1", "final"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_at_a_training_checkpoint_is_a_clear_error_and_the_run_resumes(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """The second TAPT checkpoint hits a full disk: a RunStateError saying so, no partial
    checkpoint left, the first one intact; once there is room, the same call resumes from it."""
    import errno

    from after_ray.distributed.train import local_checkpoint_dir
    from after_ray.errors import RunStateError
    from after_ray.store import torch_state

    config = tapt_config(6, "ray.num_workers=0")
    real_save = torch_state.save_training_state
    calls = []

    def save_on_a_disk_that_fills(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path)

    monkeypatch.setattr(torch_state, "save_training_state", save_on_a_disk_that_fills)
    common = dict(
        rows=small_corpus[:16],
        tapt=config.tapt,
        backbone=config.backbone,
        audio=config.audio,
        ray_cfg=config.ray,
        storage_path=tmp_path / "ray",
        name="full",
        out_dir=tmp_path / "model",
    )
    with pytest.raises(RunStateError, match="No space left on device") as info:
        run_tapt(**common)
    assert "untouched" in str(info.value) and "resume" in str(info.value)
    kept = sorted(p.name for p in local_checkpoint_dir(tmp_path / "ray", "full").iterdir())
    assert kept == ["000000"]  # the step-2 checkpoint, and no partial one
    assert not (tmp_path / "model").exists()

    monkeypatch.setattr(torch_state, "save_training_state", real_save)
    summary = run_tapt(**common)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6


def test_streamed_batches_come_in_the_in_memory_order_with_the_same_crops(
    ray_session, small_corpus, monkeypatch
):
    """The streamed path (TAPT and fine-tuning above ``ray.in_memory_audio_max_hours``) gives the
    batches of the in-memory path, in order: decode tasks that finish out of order must not
    reorder them (they did, and two TAPT runs of one seed parted at step 36 on the demo)."""
    from after_ray.distributed import audio_data
    from after_ray.distributed.worker_audio import InMemoryAudio, StreamedAudio

    config = load_config(None, ["audio.train_crop_s=0.5"])
    # Many small decode tasks of uneven duration, so that some finish before earlier ones (a
    # closure: Ray pickles it by value, the workers run it).
    monkeypatch.setattr(audio_data, "TRAIN_ROWS_PER_TASK", 2)
    decode = audio_data.decode_batch

    def uneven_decode(batch, **kwargs):
        import time
        import zlib

        time.sleep((zlib.crc32(str(batch["utt_id"][0]).encode()) % 5) * 0.02)
        return decode(batch, **kwargs)

    monkeypatch.setattr(audio_data, "decode_batch", uneven_decode)
    streamed = StreamedAudio(small_corpus, config.audio)
    in_memory = InMemoryAudio(small_corpus, config.audio)

    def ids_and_values(source, epoch: int) -> tuple[list[str], list[np.ndarray]]:
        ids, values = [], []
        for batch in source.train_batches(seed=11, epoch=epoch, batch_size=4):
            ids += [str(u) for u in batch["utt_id"]]
            values.append(np.asarray(batch["input_values"]))
        return ids, values

    for epoch in (0, 1):
        expected_ids, expected_values = ids_and_values(in_memory, epoch)
        got_ids, got_values = ids_and_values(streamed, epoch)
        assert got_ids == expected_ids
        for got, expected in zip(got_values, expected_values, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6)
