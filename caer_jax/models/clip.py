"""Flax Linen CLIP (OpenAI layout): a ViT image encoder and a causal text transformer.

Any geometry (ViT-B/32, B/16, L/14, tiny test sizes) from `CLIPGeometry`. Parameter names are
chosen so that importers are a plain renaming (clip_weights.py): attention has separate `q`, `k`,
`v`, `out` Dense layers with bias, matrices are `[in, out]`, the patch kernel is HWIO on NHWC input.

Parameters are float32; `dtype` is the compute dtype (softmax and layer-norm statistics stay in
float32). `remat=True` rematerialises every residual block in the backward pass. Attention is
`attention.multi_head` (a Pallas kernel on TPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from caer_jax import errors
from caer_jax.models import attention

LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPGeometry:
    """Sizes of a CLIP model (the fields of config.model.clip, minus `source`)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    vocab_size: int
    context_length: int
    embed_dim: int

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise errors.BadInputError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for w, h, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if w % h:
                raise errors.BadInputError(
                    f"{name}_width {w} is not a multiple of {name}_heads {h}"
                )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, clip_cfg: Any) -> CLIPGeometry:
        """From config.model.clip (a ConfigDict or anything with these attributes)."""
        return cls(**{f.name: int(getattr(clip_cfg, f.name)) for f in dataclasses.fields(cls)})

    @classmethod
    def from_hf_config(cls, config: Any) -> CLIPGeometry:
        """From a transformers.CLIPConfig; refuses what this model cannot represent."""
        v, t = config.vision_config, config.text_config
        for sub, name in ((v, "vision_config"), (t, "text_config")):
            if sub.hidden_act != "quick_gelu":
                raise ValueError(
                    f"{name}.hidden_act={sub.hidden_act!r}; only quick_gelu is supported"
                )
            if sub.intermediate_size != 4 * sub.hidden_size:
                raise ValueError(
                    f"{name}.intermediate_size={sub.intermediate_size} != 4 * hidden_size "
                    f"({4 * sub.hidden_size}); only the CLIP MLP ratio 4 is supported"
                )
            if abs(sub.layer_norm_eps - LN_EPS) > 1e-12:
                raise ValueError(f"{name}.layer_norm_eps={sub.layer_norm_eps}; expected {LN_EPS}")
        return cls(
            image_size=v.image_size,
            patch_size=v.patch_size,
            vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers,
            vision_heads=v.num_attention_heads,
            text_width=t.hidden_size,
            text_layers=t.num_hidden_layers,
            text_heads=t.num_attention_heads,
            vocab_size=t.vocab_size,
            context_length=t.max_position_embeddings,
            embed_dim=config.projection_dim,
        )

    def to_hf_config(self) -> Any:
        """The transformers.CLIPConfig of this geometry (for reference models in tests)."""
        from transformers import CLIPConfig

        return CLIPConfig(
            text_config=dict(
                vocab_size=self.vocab_size,
                hidden_size=self.text_width,
                intermediate_size=4 * self.text_width,
                num_hidden_layers=self.text_layers,
                num_attention_heads=self.text_heads,
                max_position_embeddings=self.context_length,
                projection_dim=self.embed_dim,
                eos_token_id=self.vocab_size - 1,
                bos_token_id=self.vocab_size - 2,
                pad_token_id=0,
            ),
            vision_config=dict(
                image_size=self.image_size,
                patch_size=self.patch_size,
                hidden_size=self.vision_width,
                intermediate_size=4 * self.vision_width,
                num_hidden_layers=self.vision_layers,
                num_attention_heads=self.vision_heads,
                projection_dim=self.embed_dim,
            ),
            projection_dim=self.embed_dim,
        )


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class MultiHeadAttention(nn.Module):
    """CLIP attention: q/k/v/out Dense layers with bias; causal in the text tower."""

    width: int
    heads: int
    layers: int  # of the whole tower, for the OpenAI init scale of the output projection
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        std = self.width**-0.5
        dense = lambda name, s: nn.Dense(  # noqa: E731
            self.width, dtype=self.dtype, kernel_init=_normal(s), name=name
        )
        q, k, v = (dense(name, std)(x) for name in "qkv")
        out = attention.multi_head(q, k, v, self.heads, self.causal)
        return dense("out", std * (2 * self.layers) ** -0.5)(out)


class ResidualBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)); x + mlp(ln_2(x)); MLP width 4x with QuickGELU."""

    width: int
    heads: int
    layers: int
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)  # noqa: E731
        attention_layer = MultiHeadAttention(
            self.width, self.heads, self.layers, self.dtype, self.causal, name="attn"
        )
        x = x + attention_layer(ln("ln_1")(x))
        h = ln("ln_2")(x)
        h = nn.Dense(
            4 * self.width,
            dtype=self.dtype,
            kernel_init=_normal((2 * self.width) ** -0.5),
            name="fc",
        )(h)
        h = quick_gelu(h)
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        h = nn.Dense(self.width, dtype=self.dtype, kernel_init=_normal(proj_std), name="proj")(h)
        return x + h


class Transformer(nn.Module):
    """`layers` residual blocks named resblocks_0..; optionally rematerialised."""

    width: int
    layers: int
    heads: int
    dtype: Any = jnp.float32
    remat: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        for i in range(self.layers):
            name = f"resblocks_{i}"
            x = block(self.width, self.heads, self.layers, self.dtype, self.causal, name=name)(x)
        return x


class PatchEmbedding(nn.Module):
    """Non-overlapping patches [N, H, W, 3] -> tokens [N, (H/P) * (W/P), width], row-major.

    A stride-P convolution with an HWIO `kernel` and no bias, written for each platform's
    compiler. On TPU it is the convolution: its emitter reads the images in their own layout,
    while the same function as a matmul over flattened patches makes XLA copy the images through
    three layouts first, since a minor dimension of 3 channels pads to 128 lanes (v4-8, bfloat16,
    batch 128: the embedding's part of the step 11.2 GB per chip as a matmul, 5.6 GB as the
    convolution). Elsewhere it is that matmul: XLA:CPU computes the stride-P convolution's
    kernel gradient as a dilated convolution at about 30 GFLOP/s, a tenth of its matmul rate
    (profiled in the ViT-B/32 train step at batch 2: 0.5 s of 10 s). The choice is made when the
    program is lowered, for the platform it is lowered for, as the attention kernel's is.
    """

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.patch_size, self.patch_size, images.shape[-1], self.width),
            jnp.float32,
        )
        return jax.lax.platform_dependent(
            images.astype(self.dtype),
            kernel.astype(self.dtype),
            tpu=_patches_by_convolution,
            default=_patches_by_matmul,
        )


def _patches_by_convolution(images: jax.Array, kernel: jax.Array) -> jax.Array:
    p = kernel.shape[0]
    tokens = jax.lax.conv_general_dilated(
        images, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


def _patches_by_matmul(images: jax.Array, kernel: jax.Array) -> jax.Array:
    p, _, c, width = kernel.shape
    n, h, w, _ = images.shape
    patches = images.reshape(n, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p * p * c)
    return patches @ kernel.reshape(p * p * c, width)


class VisionTransformer(nn.Module):
    """Images [N, H, W, 3] -> image features [N, embed_dim] (ln_post(CLS) @ proj, not normalised)."""

    geometry: CLIPGeometry
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        g = self.geometry
        w = g.vision_width
        scale = w**-0.5
        x = PatchEmbedding(g.patch_size, w, self.dtype, name="conv1")(images)
        cls = self.param("class_embedding", _normal(scale), (w,))
        pos = self.param("positional_embedding", _normal(scale), (g.grid**2 + 1, w))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, w))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_pre")(x)
        x = Transformer(
            w, g.vision_layers, g.vision_heads, self.dtype, self.remat, name="transformer"
        )(x)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_post")(x[:, 0])
        proj = self.param("proj", _normal(scale), (w, g.embed_dim))
        return x @ proj.astype(self.dtype)


class TextTransformer(nn.Module):
    """Causal text transformer. `__call__(ids)` or `encode(embeddings, eot_indices)`.

    Features = ln_final(x)[eot] @ text_projection (not normalised). For token ids the EOT index is
    the argmax of the ids (the end token has the largest id, as in CLIP).
    """

    geometry: CLIPGeometry
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        g = self.geometry
        self.token_embedding = nn.Embed(g.vocab_size, g.text_width, embedding_init=_normal(0.02))
        self.positional_embedding = self.param(
            "positional_embedding", _normal(0.01), (g.context_length, g.text_width)
        )
        self.transformer = Transformer(
            g.text_width, g.text_layers, g.text_heads, self.dtype, self.remat, causal=True
        )
        self.ln_final = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.text_projection = self.param(
            "text_projection", _normal(g.text_width**-0.5), (g.text_width, g.embed_dim)
        )

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """Token embeddings [..., L, text_width] (float32) of token ids [..., L]."""
        return self.token_embedding(token_ids)

    def encode(self, embeddings: jax.Array, eot_indices: jax.Array) -> jax.Array:
        """Features [N, embed_dim] of token embeddings [N, L, width] pooled at eot_indices [N]."""
        n, length, _ = embeddings.shape
        x = embeddings.astype(self.dtype) + self.positional_embedding[:length].astype(self.dtype)
        x = self.transformer(x)
        x = self.ln_final(x)
        x = x[jnp.arange(n), eot_indices]
        return x @ self.text_projection.astype(self.dtype)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return self.encode(self.embed(token_ids), jnp.argmax(token_ids, axis=-1))


class CLIP(nn.Module):
    """The two towers, for weight-import parity: (image_features, text_features), unnormalised."""

    geometry: CLIPGeometry
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.visual = VisionTransformer(self.geometry, self.dtype, self.remat)
        self.text = TextTransformer(self.geometry, self.dtype, self.remat)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.visual(images)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        return self.text(token_ids)

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.visual(images), self.text(token_ids)


def dtype_from_name(name: str) -> Any:
    """config.model.dtype ("float32", "bfloat16", "float16") -> a jnp dtype."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise errors.BadInputError(
            f"config.model.dtype={name!r}; expected one of float32, bfloat16, float16"
        ) from None
