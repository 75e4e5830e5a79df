"""`after-ray bench gpu` on a machine without CUDA: device selection, the precision ``auto``
resolves to, the fp16 scaler, the exit codes, and the stages themselves run on the CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from after_ray.bench import gpu
from after_ray.errors import ConfigError
from after_ray.training.precision import grad_scaler_for, resolve_precision


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports one CUDA device; the memory calls answer without touching a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake H100")
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2.5e9)


def test_without_cuda_it_exits_3_and_says_no_cuda_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu.NoCudaError, match="^no CUDA device: torch.cuda.is_available"):
        gpu.gpu_plan()
    assert gpu.run_gpu_check(quick=True) == gpu.EXIT_NO_CUDA == 3
    captured = capsys.readouterr()
    assert captured.err.startswith("bench gpu: no CUDA device: ")
    assert captured.out == ""  # no table, no stage ran


def test_on_cuda_auto_is_bf16_and_fp16_turns_the_scaler_on(fake_cuda):
    auto = gpu.gpu_plan()
    assert auto == gpu.GpuPlan("cuda:0", "Fake H100", "bf16", "bf16", False)
    fp16 = gpu.gpu_plan("fp16")
    assert (fp16.finetune_precision, fp16.tapt_precision, fp16.fp16_scaler) == (
        "fp16",
        "bf16",
        True,
    )
    assert gpu.gpu_plan("fp32").finetune_precision == "fp32"
    # The one rule, shared by TAPT, fine-tuning and this check.
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    scaler = grad_scaler_for("fp16", "cuda")  # torch.cuda.is_available() is patched True
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert grad_scaler_for("bf16", "cuda") is None and grad_scaler_for("fp32", "cpu") is None


def _fake_stage(step_s):
    return lambda job: {"step_s": step_s, "detail": "fake"}


def test_rows_give_rates_and_peak_memory_and_a_failed_stage_exits_1(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "_STAGE_FUNCTIONS", {s: _fake_stage(0.5) for s in gpu.STAGES})
    assert gpu.run_gpu_check(quick=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench gpu on cuda:0 (Fake H100): TAPT bf16, fine-tuning bf16 ")
    # batch 8 x 4 s in 0.5 s: 16 utterances/s, 64 s of audio per second; 2.5e9 bytes peak.
    for stage in gpu.STAGES:
        assert f"| base | {stage} | bf16 | 0.500 | 16.0 | 64.0 | 2.50 | fake |" in out
    assert "base-hubert" not in out  # --quick: wav2vec2 only

    def broken(job):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu._STAGE_FUNCTIONS, "finetune", broken)
    assert gpu.run_gpu_check() == gpu.EXIT_STAGE_FAILED == 1
    err = capsys.readouterr().err
    assert (
        "bench gpu: stage finetune of backbone 'base' failed on cuda:0: RuntimeError: CUDA error: "
        "an illegal memory access" in err
    )
    monkeypatch.setitem(gpu._STAGE_FUNCTIONS, "finetune", _fake_stage(float("nan")))
    assert gpu.run_gpu_check() == 1
    assert "stage finetune of backbone 'base': step time nan" in capsys.readouterr().err


def test_the_stages_run_for_real_on_the_cpu_in_bf16():
    """The same stage code on the tiny presets on the CPU (bf16 is allowed there), the
    wav2vec2 one with the CNN frozen so that fine-tuning trains on cached features."""
    plan = gpu.GpuPlan("cpu", "cpu", "bf16", "bf16", False)
    rows = gpu.run_stages(
        plan,
        ["tiny", "tiny-hubert"],
        overrides=["finetune.freeze_feature_encoder=true"],
        batch_size=2,
        seconds=0.5,
        steps=1,
    )
    assert [(r["backbone"], r["stage"]) for r in rows] == [
        (p, s) for p in ("tiny", "tiny-hubert") for s in gpu.STAGES
    ]
    assert {r["precision"] for r in rows} == {"bf16"}
    assert rows[0]["detail"] == "wav2vec2" and rows[3]["detail"] == "masked_prediction"
    assert rows[1]["detail"] == "cached CNN features (CNN frozen)"
    for r in rows:
        assert r["peak_cuda_gb"] is None
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0
        assert r["utterances_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["real_time_factor"] == pytest.approx(r["utterances_per_s"] * 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_command_exits_3_without_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "after_ray", "bench", "gpu", "--quick"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "bench gpu: no CUDA device: torch.cuda.is_available() is False" in proc.stderr
