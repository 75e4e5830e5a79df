"""The SER classifier: a wav2vec2-family backbone followed by a pooling head.

``SERClassifier`` = CNN feature encoder -> feature projection -> (SpecAugment, training only) ->
Transformer encoder (with the frame-level attention mask) -> pooling over valid frames ->
optional linear projection -> dropout -> linear. It accepts any Hugging Face wav2vec2, HuBERT or
WavLM model: they share ``feature_extractor`` / ``feature_projection`` / ``encoder`` and
``_get_feat_extract_output_lengths``, and we run those parts ourselves (rather than calling the
backbone's ``forward``) so that the CNN output can be cached and SpecAugment is ours (seeded by
torch, valid frames only; transformers' own masking draws from NumPy's global random state).

Two entry points share the weights:

* ``forward(input_values, attention_mask)``: from the waveform (the usual path);
* ``forward(cnn_features=..., frame_mask=...)``: from the CNN encoder's output, computed once
  with ``encode_cnn`` and cached when that encoder is frozen. Both go through ``forward`` so a
  DistributedDataParallel wrapper works with either.

Padding never changes a result. wav2vec2-base's first CNN layer normalises each channel over the
whole time axis (GroupNorm), so zero padding would shift its statistics and make an utterance's
features depend on its batch; ``encode_cnn`` computes that normalisation over valid samples only.
A valid output frame of the (unpadded) convolutions only sees valid input samples, so the CNN
output on valid frames equals that of the utterance alone.

The head is deliberately linear after pooling (no ReLU, unlike AFTER's): mean pooling followed by
linear layers is exactly what ``Wav2Vec2ForSequenceClassification`` computes, so a trained model
can be exported to a standard Hugging Face audio-classification checkpoint (see ``export.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import nn

from after_ray.errors import ConfigError

if TYPE_CHECKING:
    from after_ray.config.finetune import FinetuneConfig

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
POOLINGS = ("mean", "attentive", "layer_stats")


@dataclass(frozen=True)
class SpecAugment:
    """Time and channel masking of the encoder input (training mode only).

    Per utterance, the number of time spans is ``floor(time_prob * valid_frames / time_length +
    u)`` with ``u ~ U(0, 1)`` (so about ``time_prob`` of the valid frames are masked), at least
    ``time_min_masks``, at most ``valid_frames // time_length``; spans lie inside the valid frames
    and are filled with the backbone's ``masked_spec_embed`` (zeros if it has none). Channel spans
    (``channel_prob * hidden / channel_length`` of them, same rounding) are set to zero in every
    frame, as in AFTER.
    """

    time_prob: float = 0.0
    time_length: int = 10
    time_min_masks: int = 0
    channel_prob: float = 0.0
    channel_length: int = 10


class ClassifierOutput(NamedTuple):
    """``pooled``: pooled encoder output [B, H]; ``penultimate``: the input of the final linear
    layer [B, P] (= pooled when there is no projection); ``logits`` [B, C]."""

    pooled: torch.Tensor
    penultimate: torch.Tensor
    logits: torch.Tensor


def _base_model(backbone: nn.Module) -> nn.Module:
    """The bare wav2vec2/HuBERT/WavLM model inside ``backbone`` (e.g. of a *ForPreTraining)."""
    for candidate in (backbone, getattr(backbone, "base_model", None)):
        if candidate is not None and all(
            hasattr(candidate, part)
            for part in ("feature_extractor", "feature_projection", "encoder")
        ):
            return candidate
    raise ConfigError(
        f"backbone {type(backbone).__name__} is not a wav2vec2 / HuBERT / WavLM model (it lacks "
        "feature_extractor / feature_projection / encoder); load one with "
        "after_ray.models.backbones.load_backbone"
    )


def _span_count(prob: float, length: int, span: int) -> int:
    """floor(prob * length / span + u): the expected masked fraction is ``prob``."""
    return int(prob * length / span + float(torch.rand(())))


class SERClassifier(nn.Module):
    """Backbone + pooling head for utterance-level emotion classification."""

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        *,
        pooling: Literal["mean", "attentive", "layer_stats"] = "mean",
        dropout: float = 0.1,
        proj_size: int | None = None,
        spec_augment: SpecAugment | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ConfigError(f"SERClassifier needs at least 2 classes, got {n_classes}")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.backbone = _base_model(backbone)
        config = self.backbone.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"backbone model_type {getattr(config, 'model_type', None)!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "add_adapter", False):
            raise ConfigError(
                "backbone has add_adapter=True: adapters change the frame rate and are not "
                "supported for utterance classification; load the checkpoint with add_adapter=False"
            )
        self.n_classes = n_classes
        self.pooling = pooling
        self.spec_augment = spec_augment or SpecAugment()
        hidden = int(config.hidden_size)
        # The head is initialised from its own seed so that the same seed gives the same model
        # whatever was drawn from torch's global generator before.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.attention = (
                nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
                if pooling == "attentive"
                else None
            )
            pooled_size = self.pooled_size if pooling == "layer_stats" else hidden
            self.projector = nn.Linear(pooled_size, proj_size) if proj_size else None
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(proj_size or pooled_size, n_classes)
        if pooling == "layer_stats":
            # A fixed standardisation of the pooled statistics (set from the unlabeled pool by
            # the head trainer, see training/head.py): the statistics of different layers differ
            # in scale by orders of magnitude, and k-center distances need comparable units.
            self.register_buffer("pooled_shift", torch.zeros(pooled_size))
            self.register_buffer("pooled_scale", torch.ones(pooled_size))

    # ----------------------------------------------------------------- properties / freezing
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        """Width of ``ClassifierOutput.pooled``: the hidden size, or for ``layer_stats`` the mean
        and std of the CNN output, the projected features and every Transformer layer."""
        if self.pooling != "layer_stats":
            return self.hidden_size
        config = self.backbone.config
        cnn = int(config.conv_dim[-1])
        return 2 * (cnn + self.hidden_size * (1 + int(config.num_hidden_layers)))

    def set_pooled_standardisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Set the fixed ``(pooled - shift) / scale`` of the ``layer_stats`` head."""
        if self.pooling != "layer_stats":
            raise ValueError("only the layer_stats head standardises its pooled features")
        self.pooled_shift.copy_(torch.as_tensor(shift, dtype=self.pooled_shift.dtype))
        self.pooled_scale.copy_(torch.as_tensor(scale, dtype=self.pooled_scale.dtype))

    @property
    def feature_encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.feature_extractor.parameters())

    def freeze_feature_encoder(self) -> None:
        """Stop training the CNN feature encoder (its output may then be cached)."""
        self.backbone.feature_extractor._freeze_parameters()

    def unfreeze_feature_encoder(self) -> None:
        """Train the CNN feature encoder again (undoes ``freeze_feature_encoder``)."""
        extractor = self.backbone.feature_extractor
        for parameter in extractor.parameters():
            parameter.requires_grad = True
        extractor._requires_grad = True

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Number of encoder frames for utterances of ``sample_lengths`` samples."""
        lengths = self.backbone._get_feat_extract_output_lengths(sample_lengths)
        return torch.clamp(torch.as_tensor(lengths), min=0).long()

    # ----------------------------------------------------------------------------- CNN encoder
    def encode_cnn(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN encoder output ``[B, F, C]`` (zero on padded frames) and the frame mask ``[B, F]``.

        Runs without gradient when the encoder is frozen.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        lengths = attention_mask.long().sum(dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.feature_encoder_frozen):
            features = self._run_cnn(input_values, lengths)
        frame_count = self.frame_lengths(lengths).to(features.device)
        positions = torch.arange(features.shape[1], device=features.device)
        frame_mask = positions[None, :] < frame_count[:, None]
        features = features * frame_mask.unsqueeze(-1).to(features.dtype)
        return features, frame_mask

    def _run_cnn(self, input_values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        layers = list(self.backbone.feature_extractor.conv_layers)
        hidden = input_values[:, None, :]
        first = layers[0]
        norm = getattr(first, "layer_norm", None)
        padded = bool((lengths < input_values.shape[-1]).any())
        if isinstance(norm, nn.GroupNorm) and padded:
            if norm.num_groups != norm.num_channels:
                raise NotImplementedError(
                    "masked GroupNorm with num_groups != num_channels is not built yet"
                )
            hidden = first.conv(hidden)
            kernel, stride = first.conv.kernel_size[0], first.conv.stride[0]
            valid = torch.div(lengths.to(hidden.device) - kernel, stride, rounding_mode="floor") + 1
            positions = torch.arange(hidden.shape[-1], device=hidden.device)
            mask = (positions[None, :] < valid[:, None]).unsqueeze(1).to(hidden.dtype)
            count = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
            mean = (hidden * mask).sum(dim=-1, keepdim=True) / count
            var = (((hidden - mean) * mask) ** 2).sum(dim=-1, keepdim=True) / count
            hidden = (hidden - mean) / torch.sqrt(var + norm.eps)
            hidden = hidden * norm.weight[None, :, None] + norm.bias[None, :, None]
            hidden = first.activation(hidden)
            layers = layers[1:]
        for layer in layers:
            hidden = layer(hidden)
        return hidden.transpose(1, 2)

    # ------------------------------------------------------------------- encoder and head
    def _spec_augment(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        settings = self.spec_augment
        batch, frames, width = hidden.shape
        if settings.time_prob > 0:
            time_mask = torch.zeros(batch, frames, dtype=torch.bool)
            for row, valid in enumerate(frame_mask.sum(dim=1).tolist()):
                span = min(settings.time_length, valid)
                if span < 1:
                    continue
                count = max(_span_count(settings.time_prob, valid, span), settings.time_min_masks)
                count = min(count, valid // span)
                for start in torch.randint(0, valid - span + 1, (count,)).tolist():
                    time_mask[row, start : start + span] = True
            embed = getattr(self.backbone, "masked_spec_embed", None)
            fill = embed.to(hidden.dtype) if embed is not None else hidden.new_zeros(width)
            hidden = torch.where(time_mask.to(hidden.device).unsqueeze(-1), fill, hidden)
        if settings.channel_prob > 0:
            channel_mask = torch.zeros(batch, width, dtype=torch.bool)
            span = min(settings.channel_length, width)
            for row in range(batch):
                count = min(_span_count(settings.channel_prob, width, span), width // span)
                for start in torch.randint(0, width - span + 1, (count,)).tolist():
                    channel_mask[row, start : start + span] = True
            hidden = hidden.masked_fill(channel_mask.to(hidden.device).unsqueeze(1), 0.0)
        return hidden

    def _contextualise(
        self, features: torch.Tensor, frame_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last hidden state, and for ``layer_stats`` every layer's output (else [])."""
        projected = self.backbone.feature_projection(features)
        # wav2vec2 / WavLM return (projected, normalised input); HuBERT returns the tensor alone.
        hidden = projected[0] if isinstance(projected, tuple) else projected
        if self.training:
            hidden = self._spec_augment(hidden, frame_mask)
        if self.pooling != "layer_stats":
            return self.backbone.encoder(hidden, attention_mask=frame_mask)[0], []
        # Every layer's output through forward hooks: transformers 5 encoders no longer return
        # hidden states on request, and the hooks work the same for wav2vec2, HuBERT and WavLM
        # (whose layers return tuples).
        layers: list[torch.Tensor] = [features, hidden]
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, out: layers.append(out[0] if isinstance(out, tuple) else out)
            )
            for layer in self.backbone.encoder.layers
        ]
        try:
            last = self.backbone.encoder(hidden, attention_mask=frame_mask)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return last, layers

    @staticmethod
    def _layer_statistics(layers: list[torch.Tensor], frame_mask: torch.Tensor) -> torch.Tensor:
        """Mean and standard deviation over valid frames of each layer, concatenated."""
        weights = frame_mask.unsqueeze(-1).to(layers[0].dtype)
        count = weights.sum(dim=1).clamp(min=1.0)
        parts = []
        for layer in layers:
            mean = (layer * weights).sum(dim=1) / count
            var = (((layer - mean.unsqueeze(1)) * weights) ** 2).sum(dim=1) / count
            parts += [mean, torch.sqrt(var + 1e-8)]
        return torch.cat(parts, dim=-1)

    def head_from_pooled(self, pooled: torch.Tensor) -> ClassifierOutput:
        """Penultimate features and logits from pooled features (e.g. cached ones).

        For ``layer_stats`` the input is the raw statistics and ``ClassifierOutput.pooled`` is
        their standardised form (the head's input, in comparable units for k-center); a model
        with the default shift 0 / scale 1 returns the raw statistics, which is what the
        corpus-wide feature pass caches.
        """
        if self.pooling == "layer_stats":
            pooled = (pooled - self.pooled_shift) / self.pooled_scale
        penultimate = self.projector(pooled) if self.projector is not None else pooled
        logits = self.classifier(self.dropout(penultimate))
        return ClassifierOutput(pooled, penultimate, logits)

    def _head(
        self, hidden: torch.Tensor, frame_mask: torch.Tensor, layers: list[torch.Tensor]
    ) -> ClassifierOutput:
        if self.pooling == "layer_stats":
            return self.head_from_pooled(self._layer_statistics(layers, frame_mask))
        if self.attention is None:
            weights = frame_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        else:
            scores = self.attention(hidden).squeeze(-1)
            scores = scores.masked_fill(~frame_mask, torch.finfo(scores.dtype).min)
            attention = torch.softmax(scores, dim=1)
            pooled = (attention.unsqueeze(-1) * hidden).sum(dim=1)
        return self.head_from_pooled(pooled)

    # ----------------------------------------------------------------------------- forward
    def forward_features(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cnn_features: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """Pooled embedding, penultimate features and logits, from audio or cached CNN output."""
        if cnn_features is None:
            if input_values is None:
                raise ValueError("give input_values (audio) or cnn_features (cached CNN output)")
            cnn_features, frame_mask = self.encode_cnn(input_values, attention_mask)
        elif frame_mask is None:
            frame_mask = torch.ones(cnn_features.shape[:2], dtype=torch.bool)
        frame_mask = frame_mask.to(device=cnn_features.device, dtype=torch.bool)
        hidden, layers = self._contextualise(cnn_features, frame_mask)
        return self._head(hidden, frame_mask, layers)

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cnn_features: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return self.forward_features(
            input_values, attention_mask, cnn_features=cnn_features, frame_mask=frame_mask
        ).logits

    def forward_from_cnn(
        self, cnn_features: torch.Tensor, frame_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits from cached CNN encoder output (see ``encode_cnn``)."""
        return self(cnn_features=cnn_features, frame_mask=frame_mask)


def build_classifier(backbone: nn.Module, n_classes: int, cfg: FinetuneConfig) -> SERClassifier:
    """An ``SERClassifier`` with the head, SpecAugment and freezing that ``cfg`` asks for."""
    model = SERClassifier(
        backbone,
        n_classes,
        pooling=cfg.pooling,
        dropout=cfg.head_dropout,
        proj_size=cfg.proj_size,
        spec_augment=SpecAugment(
            time_prob=cfg.mask_time_prob,
            time_length=cfg.mask_time_length,
            time_min_masks=cfg.mask_time_min_masks,
            channel_prob=cfg.mask_channel_prob,
            channel_length=cfg.mask_channel_length,
        ),
        seed=cfg.seed,
    )
    # "auto" keeps what load_backbone decided from backbone.freeze_feature_encoder.
    if cfg.freeze_feature_encoder is True:
        model.freeze_feature_encoder()
    elif cfg.freeze_feature_encoder is False:
        model.unfreeze_feature_encoder()
    return model
