"""Span masks and contrastive negatives for self-supervised pre-training, from a generator we own.

transformers' ``_compute_mask_indices`` / ``_sample_negative_indices`` draw from NumPy's global
random state, so a resumed run could not equal an uninterrupted one (and every library that
touches that state would shift the masks). These draw only from the ``torch.Generator`` passed in,
on the CPU, so the same generator state gives the same masks on any device.

Both respect padding: nothing is masked beyond an utterance's valid frames, and negatives come
only from valid frames of the same utterance, never the positive frame itself (AFTER's TAPT
passed no attention mask, so padded frames were attended to and drawn as negatives).
"""

from __future__ import annotations

import numpy as np
import torch

from after_ray.seeding import seedsequence_seed


def generator_for(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``seedsequence_seed(*keys)``."""
    return torch.Generator(device="cpu").manual_seed(seedsequence_seed(*keys))


def compute_span_mask(
    frame_lengths: torch.Tensor,
    max_frames: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool ``[B, max_frames]`` mask of spans, True = masked, only within each valid length.

    Per utterance of ``L`` valid frames (Hugging Face semantics): the span length is
    ``m = min(mask_length, L)``; the number of spans is ``floor(mask_prob * L / m + u)`` with
    ``u ~ U[0, 1)``, at least ``min_masks`` and at most the ``L - m + 1`` distinct starts; starts
    are drawn without replacement, so spans may overlap and the masked share is at most
    ``mask_prob`` on average (minus overlaps). Utterances with fewer than two valid frames are
    not masked: a masked frame needs at least one other frame to serve as its negative.
    """
    lengths = frame_lengths.detach().to("cpu", torch.long)
    if lengths.dim() != 1:
        raise ValueError(f"frame_lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.max()) > max_frames:
        raise ValueError(f"a frame length exceeds max_frames={max_frames}: {lengths.tolist()}")
    if not 0.0 <= mask_prob <= 1.0 or mask_length < 1 or min_masks < 0:
        raise ValueError(
            f"need 0 <= mask_prob <= 1, mask_length >= 1, min_masks >= 0; got {mask_prob}, "
            f"{mask_length}, {min_masks}"
        )
    batch = lengths.numel()
    mask = torch.zeros(batch, max_frames, dtype=torch.bool)
    # One uniform per utterance for the stochastic rounding, drawn for every row so that the
    # generator advances by the same amount whatever the lengths are.
    rounding = torch.rand(batch, generator=generator, dtype=torch.float64)
    for b in range(batch):
        length = int(lengths[b])
        if length < 2:
            continue
        span = min(mask_length, length)
        n_starts = length - span + 1
        n_spans = int(np.floor(mask_prob * length / span + float(rounding[b])))
        n_spans = min(max(n_spans, min_masks), n_starts)
        if n_spans == 0:
            continue
        starts = torch.randperm(n_starts, generator=generator)[:n_spans]
        covered = (starts[:, None] + torch.arange(span)[None, :]).flatten()
        mask[b, covered] = True
    return mask


def sample_negatives(
    mask: torch.Tensor,
    frame_lengths: torch.Tensor,
    num_negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Long ``[B, T, K]`` negative indices into the flattened ``B*T`` frame axis.

    This is the ``sampled_negative_indices`` layout of ``Wav2Vec2ForPreTraining``: entry
    ``[b, t, k]`` is ``b * T + t'`` with ``t'`` a valid frame of utterance ``b`` and ``t' != t``,
    uniform over the ``L_b - 1`` candidates. Every row of a valid frame gets negatives (the loss
    reads only the masked rows); rows of padded frames get candidates too, drawn the same way, so
    no index anywhere points at padding. Utterances with fewer than two valid frames cannot have
    negatives: their rows point at their frame 0 and they must not be masked.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    mask = mask.detach().to("cpu", torch.bool)
    lengths = frame_lengths.detach().to("cpu", torch.long)
    batch, frames = mask.shape
    positions = torch.arange(frames)
    valid = positions[None, :] < lengths[:, None]
    if bool((mask & ~valid).any()):
        raise ValueError("mask covers padded frames; build it with compute_span_mask")
    too_short = lengths < 2
    if bool((mask & too_short[:, None]).any()):
        raise ValueError("a masked utterance has fewer than two valid frames (no negative exists)")

    # Draw r uniform on [0, L-1) and skip over the positive: t' = r + (r >= t) is uniform on
    # the valid frames other than t. float64 keeps floor(u * (L - 1)) strictly below L - 1.
    uniform = torch.rand(batch, frames, num_negatives, generator=generator, dtype=torch.float64)
    candidates = (lengths - 1).clamp(min=1).to(torch.float64)[:, None, None]
    drawn = torch.floor(uniform * candidates).to(torch.long)
    drawn = torch.minimum(drawn, (lengths - 2).clamp(min=0)[:, None, None])
    drawn = drawn + (drawn >= positions[None, :, None]).to(torch.long)
    drawn = torch.where(too_short[:, None, None], torch.zeros_like(drawn), drawn)
    offsets = (torch.arange(batch) * frames)[:, None, None]
    return drawn + offsets
