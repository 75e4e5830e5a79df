"""Where this process stands in torch.distributed: the one place TAPT, fine-tuning and the Ray
Train loops ask it."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when it is not running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
