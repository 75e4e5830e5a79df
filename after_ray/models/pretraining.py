"""Self-supervised objectives for TAPT: wav2vec 2.0's contrastive loss, HuBERT-style masked
prediction of cluster ids, and the cluster targets the latter needs.

Both objectives take the mask (and, for wav2vec2, the negatives) from the caller
(``models/masking.py``), pass the attention mask to the model, and average over masked frames.
transformers' ``Wav2Vec2ForPreTraining`` returns a *summed* contrastive loss and scales the
diversity term by the number of masked frames; AFTER used that sum as is, so its effective
learning rate grew with the batch's length. Here every term is per masked frame.

The model is always *called* (``model(...)``), never reached through ``model.module``, so a
DistributedDataParallel wrapper sees the forward pass and synchronises gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from after_ray.models.backbones import encoder_of, frames_for_samples, unwrap


def sample_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """Valid samples per utterance: ``lengths`` when the batch has it, else the attention mask."""
    if "lengths" in batch and batch["lengths"] is not None:
        return torch.as_tensor(batch["lengths"]).to(torch.long)
    return torch.as_tensor(batch["attention_mask"]).sum(-1).to(torch.long)


def frame_lengths(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Valid encoder frames per utterance (CPU long tensor [B])."""
    lengths = sample_lengths(batch).cpu()
    return frames_for_samples(model, lengths).clamp(min=0)


def num_frames(model: nn.Module, batch: dict[str, Any]) -> int:
    """Frames of the padded batch (the encoder's time axis)."""
    return int(frames_for_samples(model, int(batch["input_values"].shape[-1])))


def wav2vec2_pretraining_loss(
    model: nn.Module,
    batch: dict[str, Any],
    mask: torch.Tensor,
    negatives: torch.Tensor,
    gumbel_temperature: float,
    diversity_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """wav2vec 2.0 loss on one batch: contrastive (mean over masked frames) + weighted diversity.

    ``model`` is a ``Wav2Vec2ForPreTraining`` (or a DDP wrapper of one); ``batch`` holds
    ``input_values`` and ``attention_mask`` on the model's device; ``mask`` is bool ``[B, T]``
    and ``negatives`` long ``[B, T, K]`` in the layout of ``masking.sample_negatives``.

    Returns ``(loss, stats)``; stats are detached 0-d tensors: ``contrastive``, ``diversity``,
    ``perplexity`` (codebook perplexity over masked frames, summed over groups), ``accuracy``
    (share of masked frames whose positive outscores every negative), ``n_masked``.
    """
    core = unwrap(model)
    core.set_gumbel_temperature(gumbel_temperature)
    device = batch["input_values"].device
    mask = mask.to(device=device, dtype=torch.bool)
    outputs = model(
        input_values=batch["input_values"],
        attention_mask=batch["attention_mask"],
        mask_time_indices=mask,
    )
    predicted = outputs.projected_states  # [B, T, D]: context network output, projected
    quantized = outputs.projected_quantized_states  # [B, T, D]: targets from unmasked CNN output
    dim = quantized.shape[-1]
    n_masked = mask.sum()

    # Only masked frames are scored: gather them instead of scoring all B*T frames.
    negative_rows = negatives.to(device)[mask]  # [M, K] indices into B*T
    flat_targets = quantized.reshape(-1, dim).float()
    positives = quantized[mask].float()  # [M, D]
    # index_select, not flat_targets[negative_rows]: the backward of advanced indexing on CPU
    # (index_put_ with accumulate) adds repeated rows with atomics across threads, so two
    # processes drift apart in the last bits after a few steps; index_select's backward
    # (index_add_) adds in a fixed order at the same speed.
    distractors = flat_targets.index_select(0, negative_rows.reshape(-1)).view(
        *negative_rows.shape, dim
    )  # [M, K, D]
    candidates = torch.cat([positives[:, None, :], distractors], dim=1)  # [M, 1+K, D]
    logits = F.cosine_similarity(predicted[mask].float()[:, None, :], candidates, dim=-1)
    logits = logits / core.config.contrastive_logits_temperature
    # A distractor identical to the positive (same codevectors) cannot be told apart: drop it,
    # as transformers and fairseq do.
    same_as_positive = (distractors == positives[:, None, :]).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same_as_positive, float("-inf"))
    zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
    contrastive = F.cross_entropy(logits, zeros)

    perplexity = outputs.codevector_perplexity.float()
    n_codevectors = core.config.num_codevectors_per_group * core.config.num_codevector_groups
    diversity = (n_codevectors - perplexity) / n_codevectors
    loss = contrastive + diversity_weight * diversity
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == 0).float().mean()
    stats = {
        "contrastive": contrastive.detach(),
        "diversity": diversity.detach(),
        "perplexity": perplexity.detach(),
        "accuracy": accuracy,
        "n_masked": n_masked.detach(),
    }
    return loss, stats


class MaskedPredictionHead(nn.Module):
    """HuBERT's prediction head: project each frame, score it against one embedding per cluster.

    ``kind="cosine"`` (HuBERT): logits = cos(proj(h), e_c) / temperature. ``kind="linear"``: a
    plain linear classifier over the projection.
    """

    def __init__(
        self,
        hidden_size: int,
        num_clusters: int,
        proj_dim: int | None = None,
        logit_temperature: float = 0.1,
        kind: str = "cosine",
    ) -> None:
        super().__init__()
        if kind not in ("cosine", "linear"):
            raise ValueError(f"kind must be 'cosine' or 'linear', got {kind!r}")
        proj_dim = proj_dim or hidden_size
        self.kind = kind
        self.logit_temperature = logit_temperature
        self.proj = nn.Linear(hidden_size, proj_dim)
        if kind == "cosine":
            self.cluster_embeddings = nn.Parameter(torch.randn(num_clusters, proj_dim))
        else:
            self.classifier = nn.Linear(proj_dim, num_clusters)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = self.proj(hidden)
        if self.kind == "linear":
            return self.classifier(projected)
        cosine = (
            F.normalize(projected.float(), dim=-1)
            @ F.normalize(self.cluster_embeddings.float(), dim=-1).T
        )
        return cosine / self.logit_temperature


def hubert_pretraining_loss(
    model: nn.Module,
    head: nn.Module,
    batch: dict[str, Any],
    mask: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked prediction: cross-entropy of the cluster id of every masked frame.

    ``model`` is a bare encoder (HubertModel / WavLMModel / Wav2Vec2Model, or a DDP wrapper);
    its input features are masked with its own learned mask embedding through
    ``mask_time_indices``. ``targets`` is long ``[B, T]`` (from ``ClusterTargets``).
    Stats (detached 0-d tensors): ``masked_ce``, ``accuracy``, ``n_masked``.
    """
    device = batch["input_values"].device
    mask = mask.to(device=device, dtype=torch.bool)
    outputs = model(
        input_values=batch["input_values"],
        attention_mask=batch["attention_mask"],
        mask_time_indices=mask,
    )
    logits = head(outputs.last_hidden_state[mask]).float()  # [M, C]
    wanted = targets.to(device)[mask]
    loss = F.cross_entropy(logits, wanted)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == wanted).float().mean()
    return loss, {"masked_ce": loss.detach(), "accuracy": accuracy, "n_masked": mask.sum()}


def resolve_feature_layer(model: nn.Module, layer: int | None) -> int:
    """``None`` -> half the depth; checks the layer exists (0 = transformer input)."""
    depth = encoder_of(model).config.num_hidden_layers
    chosen = depth // 2 if layer is None else int(layer)
    if not 0 <= chosen <= depth:
        raise ValueError(
            f"tapt.hubert_feature_layer: {chosen} is out of range for a {depth}-layer model "
            f"(use 0..{depth}, or null for half the depth)"
        )
    return chosen


def truncated_encoder(model: nn.Module, layer: int) -> nn.Module:
    """A frozen, eval-mode copy of the encoder that stops after transformer layer ``layer``."""
    teacher = copy.deepcopy(encoder_of(model))
    keep = max(layer, 1)  # hidden_states[0] (the input of layer 1) needs one layer to be recorded
    teacher.encoder.layers = nn.ModuleList(list(teacher.encoder.layers)[:keep])
    teacher.config.num_hidden_layers = keep
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def layer_features(encoder: nn.Module, batch: dict[str, Any], layer: int) -> torch.Tensor:
    """Hidden states ``[B, T, D]`` of ``encoder`` at ``layer`` (0 = transformer input)."""
    outputs = encoder(
        input_values=batch["input_values"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
    )
    return outputs.hidden_states[layer]


def _valid_frames(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    valid = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    return features[valid.to(features.device)]


def fit_cluster_targets(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    layer: int,
    n_clusters: int,
    seed: int,
    *,
    iters: int = 25,
    max_frames: int = 100_000,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """FAISS k-means centroids ``[n_clusters, D]`` (float32) of the model's own layer features.

    Features are taken in eval mode from valid (non-padded) frames only; at most ``max_frames``
    of them (a seeded random subset) go into k-means.
    """
    teacher = truncated_encoder(model, layer)
    if device is not None:
        teacher.to(device)
    return _kmeans(_collect_features(teacher, batches, layer), n_clusters, seed, iters, max_frames)


def _collect_features(
    teacher: nn.Module, batches: Iterable[dict[str, Any]], layer: int
) -> np.ndarray:
    device = next(teacher.parameters()).device
    chunks: list[np.ndarray] = []
    for batch in batches:
        on_device = {
            k: torch.as_tensor(batch[k]).to(device) for k in ("input_values", "attention_mask")
        }
        features = layer_features(teacher, on_device, layer).float()
        lengths = frame_lengths(teacher, batch)
        chunks.append(_valid_frames(features, lengths).cpu().numpy())
    if not chunks:
        return np.zeros((0, teacher.config.hidden_size), np.float32)
    return np.concatenate(chunks)


def _kmeans(
    data: np.ndarray, n_clusters: int, seed: int, iters: int, max_frames: int
) -> np.ndarray:
    if data.shape[0] < n_clusters:
        raise ValueError(
            f"k-means needs at least {n_clusters} frames, the TAPT batches gave {data.shape[0]} "
            "(lower tapt.hubert_num_clusters or read more tapt.hubert_kmeans_batches)"
        )
    rng = np.random.default_rng(seed)
    if data.shape[0] > max_frames:
        data = data[np.sort(rng.choice(data.shape[0], size=max_frames, replace=False))]
    data = np.ascontiguousarray(data, dtype=np.float32)
    kmeans = faiss.Kmeans(
        data.shape[1], n_clusters, niter=iters, seed=int(seed) % (2**31), verbose=False
    )
    # faiss-cpu ships its own OpenMP runtime; once its worker threads have run, they kept
    # torch's threads from the cores for the next ~20 training steps (measured on 2 cores: a
    # 60-step tiny-hubert run took 23 s instead of 5 s). One thread is plenty for a TAPT-sized
    # k-means (100k frames x 768 dims x 100 clusters: seconds), so faiss never spawns them.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        kmeans.train(data)
    finally:
        faiss.omp_set_num_threads(threads)
    return np.asarray(kmeans.centroids, dtype=np.float32).reshape(n_clusters, -1)


def assign_targets(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared L2, as FAISS assigns) of every feature vector: long ``[...]``."""
    flat = features.reshape(-1, features.shape[-1]).float()
    cents = centroids.to(device=flat.device, dtype=torch.float32)
    # argmin |f - c|^2 = argmax (2 f.c - |c|^2); |f|^2 is the same for every c.
    scores = 2.0 * flat @ cents.T - (cents * cents).sum(-1)[None, :]
    return scores.argmax(-1).reshape(features.shape[:-1])


class ClusterTargets(nn.Module):
    """Frame targets for masked prediction: a frozen teacher (the model as TAPT found it, cut
    after the feature layer) plus k-means centroids over its features.

    The teacher must stay fixed: if targets came from the student being trained, it could make
    them trivial (every frame in one cluster).
    """

    def __init__(self, teacher: nn.Module, centroids: torch.Tensor, layer: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.layer = layer
        self.register_buffer("centroids", centroids.to(torch.float32))

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        batches: Iterable[dict[str, Any]],
        layer: int,
        n_clusters: int,
        seed: int,
        *,
        iters: int = 25,
        max_frames: int = 100_000,
    ) -> ClusterTargets:
        """Freeze a copy of ``model`` (on its device) and fit k-means on its features."""
        teacher = truncated_encoder(model, layer)
        centroids = _kmeans(
            _collect_features(teacher, batches, layer), n_clusters, seed, iters, max_frames
        )
        return cls(teacher, torch.from_numpy(centroids), layer)

    @classmethod
    def empty_like(cls, model: nn.Module, layer: int, n_clusters: int) -> ClusterTargets:
        """Same structure as a fitted one (for ``load_state_dict`` when resuming)."""
        teacher = truncated_encoder(model, layer)
        hidden = teacher.config.hidden_size
        return cls(teacher, torch.zeros(n_clusters, hidden), layer)

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        self.teacher.eval()
        features = layer_features(self.teacher, batch, self.layer)
        return assign_targets(features, self.centroids)
