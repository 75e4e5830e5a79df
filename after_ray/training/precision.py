"""Mixed precision for TAPT and fine-tuning: one rule for what ``precision: auto`` means.

``auto`` is bf16 autocast on a CUDA device and fp32 everywhere else (CPU bf16 autocast is slow and
gains nothing for the tiny model); ``bf16`` on the CPU is allowed, to test the GPU code path
here; ``fp16`` needs CUDA (its loss scaling, ``torch.amp.GradScaler``, is a CUDA feature here)
and is refused on the CPU with a ConfigError that says to use bf16. Autocast only wraps the
forward pass and the loss: weights, gradients and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from after_ray.errors import ConfigError

Resolved = Literal["fp32", "bf16", "fp16"]


def resolve_precision(precision: str, device: torch.device | str) -> Resolved:
    """What ``precision`` (auto | fp32 | bf16 | fp16) means on ``device``."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision fp16 needs a CUDA device (its GradScaler loss scaling), but this runs on "
            f"{device.type}: use precision bf16 (or auto/fp32) there"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision  # type: ignore[return-value]


def autocast_for(
    resolved: Resolved, device: torch.device | str
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    device = torch.device(device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler_for(resolved: Resolved, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (small fp16 gradients underflow without it); None otherwise."""
    if resolved != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
