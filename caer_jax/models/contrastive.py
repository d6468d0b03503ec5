"""CLIP as pretraining trains it: both towers of clip.CLIP and a learned temperature, with CLIP's
contrastive loss (the symmetric cross-entropy over the image-text cosine similarities of a batch,
scaled by exp(t), t initialised to log(1 / init_temperature))."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from caer_jax import errors
from caer_jax.models import caer, clip


class ContrastiveCLIP(nn.Module):
    """The two towers of clip.CLIP (same parameter names: "visual", "text") and the learned
    log logit scale."""

    geometry: clip.CLIPGeometry
    init_temperature: float
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.visual = clip.VisionTransformer(self.geometry, self.dtype, self.remat)
        self.text = clip.TextTransformer(self.geometry, self.dtype, self.remat)
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.initializers.constant(-math.log(self.init_temperature)), ()
        )

    def __call__(self, images: jax.Array, token_ids: jax.Array):
        return self.visual(images), self.text(token_ids), self.log_logit_scale


def contrastive_loss(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """CLIP's loss: mean of the image->text and text->image cross-entropies, pair i the target
    of row i; and the image->text top-1 accuracy."""
    i = caer.l2_normalize(image_features.astype(jnp.float32))
    t = caer.l2_normalize(text_features.astype(jnp.float32))
    logits = logit_scale * i @ t.T
    targets = jnp.arange(logits.shape[0])
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    per_text = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
    return (per_image.mean() + per_text.mean()) / 2, accuracy


def make_optimizer(optim_cfg: ml_collections.ConfigDict, num_steps: int):
    """AdamW with a linear warm-up and a cosine decay to zero; weight decay on matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim_cfg.lr, optim_cfg.warmup_steps, max(num_steps, optim_cfg.warmup_steps + 1)
    )
    return optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )


def build_model(model_cfg: ml_collections.ConfigDict) -> ContrastiveCLIP:
    """The model of `config.model`; a value it has no meaning for is named."""
    if model_cfg.pixel_normalization not in caer.PIXEL_NORMALIZATIONS:
        raise errors.BadInputError(
            f"config.model.pixel_normalization={model_cfg.pixel_normalization!r}; expected "
            f"one of {', '.join(caer.PIXEL_NORMALIZATIONS)}"
        )
    if not 0 < model_cfg.init_temperature <= 1:
        raise errors.BadInputError(
            f"config.model.init_temperature={model_cfg.init_temperature}; expected in (0, 1]"
        )
    return ContrastiveCLIP(
        clip.CLIPGeometry.from_config(model_cfg.clip),
        model_cfg.init_temperature,
        clip.dtype_from_name(model_cfg.dtype),
        model_cfg.remat,
    )
