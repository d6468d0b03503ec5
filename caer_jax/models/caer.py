"""CLIP-CAER: a shared CLIP image encoder on face and context clips, one temporal transformer per
stream, fusion, and CoOp prompts through the frozen CLIP text encoder (REFERENCE.md, "Model").

  model, tokenizer = build_model(config.model)
  params = init_params(model, config.model, rng, num_frames=config.data.num_segments)
  logits, aux = model.apply({"params": params}, face, context, train=True, rngs={"dropout": key})
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from caer_jax import errors, label_sets
from caer_jax.models import attention
from caer_jax.models import clip as clip_lib
from caer_jax.models import tokenizer as tokenizer_lib

STREAMS = ("face", "context", "both")
POSITIONS = ("end", "middle", "front")
TEMPORAL_LN_EPS = 1e-5


def _torch_linear(
    features: int,
    in_features: int,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense initialised like torch.nn.Linear: U(+-1/sqrt(in)) for weight and bias."""
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=bias_init,
        name=name,
    )


def tanh_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class TemporalBlock(nn.Module):
    """x + to_out(MHA(attn_norm(x))); x + fc2(gelu_tanh(fc1(mlp_norm(x)))), dropout after each."""

    dim: int
    heads: int
    head_dim: int
    mlp_dim: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inner = self.heads * self.head_dim
        drop = nn.Dropout(self.dropout, deterministic=not train)
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=TEMPORAL_LN_EPS, dtype=self.dtype, name=name
        )
        h = ln("attn_norm")(x)
        qkv = _torch_linear(3 * inner, self.dim, use_bias=False, dtype=self.dtype, name="to_qkv")(h)
        h = attention.multi_head(*jnp.split(qkv, 3, -1), self.heads)
        x = x + drop(_torch_linear(self.dim, inner, dtype=self.dtype, name="to_out")(h))
        h = ln("mlp_norm")(x)
        h = drop(tanh_gelu(_torch_linear(self.mlp_dim, self.dim, dtype=self.dtype, name="fc1")(h)))
        h = drop(_torch_linear(self.dim, self.mlp_dim, dtype=self.dtype, name="fc2")(h))
        return x + h


class TemporalTransformer(nn.Module):
    """Frame features [B, T, D] -> clip feature [B, D] (the output at a learned CLS token).

    `cls_token` [1, 1, D] and `pos_embedding` [1, T+1, D] are initialised N(0, init_std**2)
    (the authors: std 1); T is fixed by the clip length seen at init.
    """

    depth: int
    heads: int
    head_dim: int
    mlp_dim: int
    dropout: float
    dtype: Any = jnp.float32
    init_std: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        if self.has_variable("params", "pos_embedding"):
            held = self.get_variable("params", "pos_embedding").shape[1] - 1
            if held != t:
                raise ValueError(
                    f"{self.name}: pos_embedding holds {held} frames but the clip has {t}"
                )
        cls = self.param("cls_token", nn.initializers.normal(self.init_std), (1, 1, d))
        pos = self.param("pos_embedding", nn.initializers.normal(self.init_std), (1, t + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = TemporalBlock(
                d,
                self.heads,
                self.head_dim,
                self.mlp_dim,
                self.dropout,
                self.dtype,
                name=f"layers_{i}",
            )(x, train)
        return x[:, 0]


class PromptLearner(nn.Module):
    """CoOp context vectors placed around the frozen class-text token embeddings.

    `ctx` is [n_cls, n_ctx, width] (class-specific) or [n_ctx, width] (generic), N(0, init_std).
    `name_lens[i]` is the number of tokens of class text i (they follow the context in "end").
    """

    n_cls: int
    n_ctx: int
    width: int
    class_specific: bool
    position: str
    init_std: float
    name_lens: tuple[int, ...]

    @nn.compact
    def __call__(self, prefix: jax.Array, suffix: jax.Array) -> jax.Array:
        """prefix [n_cls, 1, W] (start token), suffix [n_cls, L-1-n_ctx, W] -> [n_cls, L, W]."""
        shape = (
            (self.n_cls, self.n_ctx, self.width)
            if self.class_specific
            else (self.n_ctx, self.width)
        )
        ctx = self.param("ctx", nn.initializers.normal(self.init_std), shape)
        if not self.class_specific:
            ctx = jnp.broadcast_to(ctx, (self.n_cls, self.n_ctx, self.width))
        if self.position == "end":
            return jnp.concatenate([prefix, ctx, suffix], axis=1)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            p, c, name, rest = prefix[i], ctx[i], suffix[i, :n], suffix[i, n:]
            if self.position == "middle":
                rows.append(jnp.concatenate([p, c[:half], name, c[half:], rest]))
            elif self.position == "front":
                rows.append(jnp.concatenate([p, name, c, rest]))
            else:
                raise ValueError(
                    f"config.model.prompt.class_token_position={self.position!r}; "
                    f"expected one of {POSITIONS}"
                )
        return jnp.stack(rows)


class CLIPCAER(nn.Module):
    """The whole model. `prompt_token_ids` are the tokenised prompts ("X"*n_ctx + class text)."""

    geometry: clip_lib.CLIPGeometry
    prompt_token_ids: tuple[tuple[int, ...], ...]
    n_ctx: int
    class_specific: bool = True
    class_token_position: str = "end"
    ctx_init_std: float = 0.02
    streams: str = "both"
    temporal_depth: int = 1
    temporal_heads: int = 8
    temporal_head_dim: int = 64
    temporal_mlp_dim: int = 1024
    temporal_dropout: float = 0.1
    temporal_init_std: float = 1.0
    pixel_normalization: str = "none"
    freeze_image_encoder: bool = False
    logit_scale: float = 100.0
    dtype: Any = jnp.float32
    remat: bool = False
    num_frames: int | None = None  # clip length used by init_params when not given there

    @property
    def n_cls(self) -> int:
        return len(self.prompt_token_ids)

    def setup(self):
        ids = np.asarray(self.prompt_token_ids)
        self._ids = ids
        self._eot = ids.argmax(-1)
        name_lens = tuple(int(e) - 1 - self.n_ctx for e in self._eot)
        g = self.geometry
        self.image_encoder = clip_lib.VisionTransformer(g, self.dtype, self.remat)
        self.text_encoder = clip_lib.TextTransformer(g, self.dtype, self.remat)
        self.prompt_learner = PromptLearner(
            self.n_cls,
            self.n_ctx,
            g.text_width,
            self.class_specific,
            self.class_token_position,
            self.ctx_init_std,
            name_lens,
        )
        temporal = lambda: TemporalTransformer(  # noqa: E731
            self.temporal_depth,
            self.temporal_heads,
            self.temporal_head_dim,
            self.temporal_mlp_dim,
            self.temporal_dropout,
            self.dtype,
            self.temporal_init_std,
        )
        if self.streams in ("face", "both"):
            self.temporal_face = temporal()
        if self.streams in ("context", "both"):
            self.temporal_context = temporal()
        if self.streams == "both":
            self.project_fc = _torch_linear(g.embed_dim, 2 * g.embed_dim, dtype=self.dtype)

    def prompt_embeddings(self) -> jax.Array:
        """The learned prompts [n_cls, context_length, text_width] fed to the text encoder."""
        ids = jnp.asarray(self._ids)
        # The start/class-text/end embeddings are constants (buffers in the reference): gradients
        # reach only the context vectors.
        emb = jax.lax.stop_gradient(self.text_encoder.embed(ids))
        return self.prompt_learner(emb[:, :1], emb[:, 1 + self.n_ctx :])

    def text_features(self) -> jax.Array:
        """L2-normalised class text features [n_cls, embed_dim] (float32)."""
        feats = self.text_encoder.encode(self.prompt_embeddings(), jnp.asarray(self._eot))
        return l2_normalize(feats.astype(jnp.float32))

    def _needed_streams(self, face: Any, context: Any) -> tuple[str, ...]:
        need = {"face": ("face",), "context": ("context",), "both": ("face", "context")}
        clips = {"face": face, "context": context}
        for s in need[self.streams]:
            if clips[s] is None:
                raise ValueError(f"streams={self.streams!r} needs the {s} clip, got None")
        return need[self.streams]

    def encode_frames(self, pixels: jax.Array) -> jax.Array:
        """Frames [..., H, W, 3] -> image features [..., embed_dim] (the shared CLIP encoder).

        uint8 pixels become float32 in [0, 1] (x / 255) here, inside the jitted step; float
        pixels are taken as already in [0, 1]. Then the optional CLIP mean/std normalisation.
        The feature cache calls this method, so cached and pixel paths share it exactly.
        """
        lead = pixels.shape[:-3]
        frames = encoder_input(pixels.reshape(-1, *pixels.shape[-3:]), self.pixel_normalization)
        feats = self.image_encoder(frames)
        return feats.reshape(*lead, feats.shape[-1])

    def from_features(
        self, face_feats: jax.Array | None, context_feats: jax.Array | None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-frame image features [B, T, D] of each used stream -> (logits, aux): the temporal
        nets, fusion and the prompts; everything of the model after the image encoder."""
        used = self._needed_streams(face_feats, context_feats)
        feats = {"face": face_feats, "context": context_feats}
        video = []
        for s in used:
            net = self.temporal_face if s == "face" else self.temporal_context
            video.append(net(feats[s], train))
        if self.streams == "both":
            v = self.project_fc(jnp.concatenate(video, axis=-1))
        else:
            v = video[0]
        v = l2_normalize(v.astype(jnp.float32))
        text = self.text_features()
        logits = self.logit_scale * v @ text.T
        return logits, {"video_features": v, "text_features": text}

    def zero_shot_from_features(
        self, face_feats: jax.Array | None, context_feats: jax.Array | None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Zero-shot CLIP: per-frame image features [B, T, D] of each used stream -> (logits,
        aux), nothing learned in between. A clip's feature is the mean of its L2-normalised
        frame features over the frames of every used stream, normalised again (each frame
        weighs the same whatever its feature's norm; with both streams the face and context
        frames alike, which is the mean of the two streams' means); logits are logit_scale x its
        cosine with each class text. Meant for a model built with prompt.n_ctx = 0, whose text
        features are then CLIP's own embeddings of the class texts. `train` is unused."""
        used = self._needed_streams(face_feats, context_feats)
        feats = {"face": face_feats, "context": context_feats}
        frames = jnp.concatenate([l2_normalize(feats[s].astype(jnp.float32)) for s in used], 1)
        v = l2_normalize(frames.mean(axis=1))
        text = self.text_features()
        logits = self.logit_scale * v @ text.T
        return logits, {"video_features": v, "text_features": text}

    def _stream_features(self, face: jax.Array | None, context: jax.Array | None) -> dict:
        used = self._needed_streams(face, context)
        clips = {"face": face, "context": context}
        # One pass of the shared image encoder over all frames of all used streams, stacked
        # within each clip: a device then encodes the frames of its own clips. Concatenated along
        # the batch axis instead, a device's share of the frames would be other devices' clips,
        # exchanged between chips (all-to-alls of uint8 frames) before the encoder.
        feats = self.encode_frames(jnp.stack([clips[s] for s in used], axis=1))
        return {s: feats[:, i] for i, s in enumerate(used)}

    def zero_shot(
        self, face: jax.Array | None, context: jax.Array | None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """zero_shot_from_features on pixels (the signature of __call__)."""
        parts = self._stream_features(face, context)
        return self.zero_shot_from_features(parts.get("face"), parts.get("context"), train)

    def __call__(
        self, face: jax.Array | None, context: jax.Array | None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        parts = self._stream_features(face, context)
        if self.freeze_image_encoder:
            # As the frozen text embeddings: no gradient, hence no backward pass, through it.
            parts = jax.lax.stop_gradient(parts)
        return self.from_features(parts.get("face"), parts.get("context"), train)


# OpenAI CLIP's input normalisation, applied when config.model.pixel_normalization == "clip".
# The authors feed [0, 1] pixels unnormalised ("none"), which pretrained CLIP tolerates; a randomly
# initialised ViT learns far faster on centred inputs.
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
PIXEL_NORMALIZATIONS = ("none", "clip")


def pixels_to_unit_range(pixels: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1] (divided by 255, as torchvision's ToTensor); float
    pixels are taken as already scaled. The input pipeline hands over uint8, so the conversion
    runs on the device inside the jitted step: 4x fewer bytes cross from the host, and no host
    core spends its time on a float copy of every batch."""
    if jnp.issubdtype(pixels.dtype, jnp.integer):
        return pixels.astype(jnp.float32) / 255.0
    return pixels


def encoder_input(pixels: jax.Array, pixel_normalization: str) -> jax.Array:
    """Pixels -> the image encoder's input: [0, 1] (pixels_to_unit_range), then CLIP's mean/std
    normalisation when `pixel_normalization` is "clip"."""
    x = pixels_to_unit_range(pixels)
    if pixel_normalization == "clip":
        x = (x - jnp.asarray(CLIP_PIXEL_MEAN)) / jnp.asarray(CLIP_PIXEL_STD)
    return x


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def prompt_texts(model_cfg: Any) -> list[str]:
    """The prompt of each class of the label set: n_ctx context placeholders, then the class
    text of the text type."""
    placeholders = [tokenizer_lib.CONTEXT_PLACEHOLDER] * model_cfg.prompt.n_ctx
    try:
        label_set = label_sets.load(model_cfg.label_set)
    except label_sets.LabelSetError as e:
        raise label_sets.LabelSetError(
            f"config.model.label_set={model_cfg.label_set!r}: {e}"
        ) from e
    texts = label_set.class_texts(model_cfg.prompt.text_type)
    return [" ".join([*placeholders, t]) for t in texts]


def check_model_config(model_cfg: Any) -> clip_lib.CLIPGeometry:
    """Refuses config.model values this model has no meaning for (a stream, normalisation or
    class token position it does not know, a label set or text type that is not there, a CLIP
    geometry that does not fit together), naming the field; returns the CLIP geometry. Reads no
    weights and no tokenizer, so a grid of configs can be checked before any of them runs."""
    geometry = clip_lib.CLIPGeometry.from_config(model_cfg.clip)
    if model_cfg.streams not in STREAMS:
        raise errors.BadInputError(
            f"config.model.streams={model_cfg.streams!r}; expected one of {STREAMS}"
        )
    if model_cfg.pixel_normalization not in PIXEL_NORMALIZATIONS:
        raise errors.BadInputError(
            f"config.model.pixel_normalization={model_cfg.pixel_normalization!r}; expected one "
            f"of {PIXEL_NORMALIZATIONS}"
        )
    if model_cfg.prompt.class_token_position not in POSITIONS:
        raise errors.BadInputError(
            f"config.model.prompt.class_token_position={model_cfg.prompt.class_token_position!r}; "
            f"expected one of {POSITIONS}"
        )
    clip_lib.dtype_from_name(model_cfg.dtype)
    prompt_texts(model_cfg)  # the label set loads, and holds the text type
    return geometry


def build_model(
    model_cfg: Any,
    *,
    tokenizer: Any = None,
    prompt_token_ids: np.ndarray | None = None,
    num_frames: int | None = None,
) -> tuple[CLIPCAER, Any]:
    """The CLIPCAER module of config.model and its tokenizer.

    `prompt_token_ids` [n_cls, context_length] overrides tokenisation (the converter reads them
    off a checkpoint); then `tokenizer` may be None.
    """
    geometry = check_model_config(model_cfg)
    if prompt_token_ids is None:
        if tokenizer is None:
            tokenizer = tokenizer_lib.load_tokenizer(model_cfg.clip)
        prompt_token_ids = tokenizer_lib.tokenize(
            tokenizer, prompt_texts(model_cfg), geometry.context_length
        )
    ids = np.asarray(prompt_token_ids)
    if ids.shape[1] != geometry.context_length:
        raise ValueError(
            f"prompt token ids have length {ids.shape[1]}, config.model.clip.context_length is "
            f"{geometry.context_length}"
        )
    if ids.max() >= geometry.vocab_size:
        raise ValueError(
            f"token id {ids.max()} >= config.model.clip.vocab_size {geometry.vocab_size}"
        )
    model = CLIPCAER(
        geometry=geometry,
        prompt_token_ids=tuple(tuple(int(i) for i in row) for row in ids),
        n_ctx=model_cfg.prompt.n_ctx,
        class_specific=model_cfg.prompt.class_specific,
        class_token_position=model_cfg.prompt.class_token_position,
        ctx_init_std=model_cfg.prompt.ctx_init_std,
        streams=model_cfg.streams,
        temporal_depth=model_cfg.temporal.depth,
        temporal_heads=model_cfg.temporal.heads,
        temporal_head_dim=model_cfg.temporal.head_dim,
        temporal_mlp_dim=model_cfg.temporal.mlp_dim,
        temporal_dropout=model_cfg.temporal.dropout,
        temporal_init_std=model_cfg.temporal.init_std,
        pixel_normalization=model_cfg.pixel_normalization,
        freeze_image_encoder=model_cfg.freeze_image_encoder,
        logit_scale=model_cfg.logit_scale,
        dtype=clip_lib.dtype_from_name(model_cfg.dtype),
        remat=model_cfg.remat,
        num_frames=num_frames,
    )
    return model, tokenizer


def dummy_clip(model: CLIPCAER, num_frames: int, batch_size: int = 1) -> jax.Array:
    s = model.geometry.image_size
    return jnp.zeros((batch_size, num_frames, s, s, 3), jnp.float32)


def init_params(
    model: CLIPCAER, model_cfg: Any, rng: jax.Array, *, num_frames: int | None = None
) -> dict:
    """Random parameters; CLIP weights from config.model.clip.source unless it is "random".

    The clip length (the temporal positional embedding has T+1 rows) is `num_frames`, else
    `model.num_frames`; pass config.data.num_segments.
    """
    t = num_frames if num_frames is not None else model.num_frames
    if t is None:
        raise ValueError(
            "init_params needs the clip length: pass num_frames=config.data.num_segments "
            "(or build_model(..., num_frames=...))"
        )
    clip_params = None
    if model_cfg.clip.source != "random":  # read (and check) the weights before any compute
        from caer_jax.models import clip_weights

        clip_params = clip_weights.load_clip_params(model_cfg.clip.source, model.geometry)
    x = dummy_clip(model, t)
    init = lambda r: model.init(r, x, x, train=False)["params"]  # noqa: E731
    if clip_params is None:
        return jax.jit(init)(rng)
    # Only the CLIP-CAER parts are random. Returning only those lets XLA drop the encoders'
    # random initialisation: at ViT-B/32 size XLA spent over two minutes compiling the full
    # init program on a 2-core CPU, for values that would be overwritten.
    loaded = {"image_encoder": "visual", "text_encoder": "text"}
    shapes = jax.eval_shape(init, rng)
    params = dict(jax.jit(lambda r: {k: v for k, v in init(r).items() if k not in loaded})(rng))
    for ours, theirs in loaded.items():
        params[ours] = clip_weights.merge_checked(shapes[ours], clip_params[theirs], ours)
    return params
