"""Import CLIP weights into the Flax CLIP of clip.py, with explicit name and layout mapping.

Accepted sources (`load_clip_params(source)`):
  - a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin) or hub id
    (downloaded through huggingface_hub when there is a network);
  - flax_model.msgpack as written by transformers 4.x's Flax CLIP (a file, or a folder holding one);
  - an OpenAI CLIP state dict (`visual.*`, `transformer.*`, ...) in a .pt/.pth file (a plain
    `torch.save` of the state dict, read with `weights_only=True`, or OpenAI's TorchScript archive).

Layouts: PyTorch Linear `[out, in]` -> Dense kernel `[in, out]`; conv `[out, in, kh, kw]` (NCHW) ->
HWIO; OpenAI's packed `in_proj_weight [3W, W]` -> q, k, v (in that order). Every importer returns
the parameter tree of `clip.CLIP` ({"visual": ..., "text": ...}, numpy float32) and the geometry
the tensors imply; every mismatch names the key and both shapes.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from caer_jax import errors
from caer_jax.models import hub
from caer_jax.models.clip import CLIPGeometry

FORMATS = (
    "a Hugging Face CLIP folder or hub id (config.json + model.safetensors or pytorch_model.bin)",
    "flax_model.msgpack of transformers 4.x Flax CLIP (file, or folder holding it)",
    "an OpenAI CLIP state dict file (.pt/.pth: torch.save of a state dict, or a TorchScript archive)",
)
# Buffers and parameters that the Flax model does not hold (logit scale comes from the config).
_IGNORED = re.compile(r"(.*position_ids|logit_scale|input_resolution|context_length|vocab_size)$")


class WeightsError(errors.BadInputError):
    """A checkpoint does not fit the model: names the key, and both shapes where they differ."""


# ----------------------------------------------------------------------------------------------
# Small helpers


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach()
        if x.dtype.is_floating_point and x.dtype != __import__("torch").float32:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class _Source:
    """A flat name -> tensor mapping whose keys are consumed as they are mapped."""

    def __init__(self, tensors: Mapping[str, Any], what: str):
        self.tensors = dict(tensors)
        self.what = what
        self.used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise WeightsError(f"{self.what}: missing key {key!r}")
        self.used.add(key)
        return _np(self.tensors[key]).astype(np.float32, copy=False)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def check_all_used(self) -> None:
        extra = sorted(k for k in self.tensors if k not in self.used and not _IGNORED.match(k))
        if extra:
            shape = tuple(_np(self.tensors[extra[0]]).shape)
            raise WeightsError(
                f"{self.what}: unexpected key {extra[0]!r} with shape {shape}"
                + (f" (and {len(extra) - 1} more: {extra[1:4]})" if len(extra) > 1 else "")
            )


def _layer_count(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise WeightsError(f"layer indices {sorted(found)} of {pattern!r} are not 0..n-1")
    return len(found)


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _flatten(tree: Mapping) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


# ----------------------------------------------------------------------------------------------
# Per-format name maps. Each block mapper fills our names under `dst` from a source block.


def _linear(flat, dst, src: _Source, w: str, b: str | None) -> None:
    flat[f"{dst}/kernel"] = src.get(w).T
    if b is not None:
        flat[f"{dst}/bias"] = src.get(b)


def _norm(flat, dst, src: _Source, prefix: str, scale="weight", bias="bias") -> None:
    flat[f"{dst}/scale"] = src.get(f"{prefix}.{scale}")
    flat[f"{dst}/bias"] = src.get(f"{prefix}.{bias}")


def _hf_block(flat, dst, src: _Source, p: str) -> None:
    _norm(flat, f"{dst}/ln_1", src, f"{p}.layer_norm1")
    _norm(flat, f"{dst}/ln_2", src, f"{p}.layer_norm2")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
        _linear(
            flat,
            f"{dst}/attn/{ours}",
            src,
            f"{p}.self_attn.{theirs}.weight",
            f"{p}.self_attn.{theirs}.bias",
        )
    _linear(flat, f"{dst}/fc", src, f"{p}.mlp.fc1.weight", f"{p}.mlp.fc1.bias")
    _linear(flat, f"{dst}/proj", src, f"{p}.mlp.fc2.weight", f"{p}.mlp.fc2.bias")


def _openai_block(flat, dst, src: _Source, p: str) -> None:
    _norm(flat, f"{dst}/ln_1", src, f"{p}.ln_1")
    _norm(flat, f"{dst}/ln_2", src, f"{p}.ln_2")
    w = src.get(f"{p}.attn.in_proj_weight")
    b = src.get(f"{p}.attn.in_proj_bias")
    if w.shape[0] % 3 or b.shape[0] != w.shape[0]:
        raise WeightsError(
            f"{src.what}: {p}.attn.in_proj_weight has shape {w.shape} and in_proj_bias "
            f"{b.shape}; expected [3W, W] and [3W]"
        )
    for i, name in enumerate(("q", "k", "v")):
        n = w.shape[0] // 3
        flat[f"{dst}/attn/{name}/kernel"] = w[i * n : (i + 1) * n].T
        flat[f"{dst}/attn/{name}/bias"] = b[i * n : (i + 1) * n]
    _linear(flat, f"{dst}/attn/out", src, f"{p}.attn.out_proj.weight", f"{p}.attn.out_proj.bias")
    _linear(flat, f"{dst}/fc", src, f"{p}.mlp.c_fc.weight", f"{p}.mlp.c_fc.bias")
    _linear(flat, f"{dst}/proj", src, f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias")


def _geometry(flat: dict[str, np.ndarray], heads: tuple[int, int] | None) -> CLIPGeometry:
    """Geometry implied by our-named tensors (OpenAI's build_model rules; heads = width // 64)."""
    conv = flat["visual/conv1/kernel"]
    vw, tw = conv.shape[3], flat["text/ln_final/scale"].shape[0]
    grid = round((flat["visual/positional_embedding"].shape[0] - 1) ** 0.5)
    vh, th = heads if heads else (max(vw // 64, 1), max(tw // 64, 1))
    return CLIPGeometry(
        image_size=grid * conv.shape[0],
        patch_size=conv.shape[0],
        vision_width=vw,
        vision_layers=_layer_count(flat, r"visual/transformer/resblocks_(\d+)/"),
        vision_heads=vh,
        text_width=tw,
        text_layers=_layer_count(flat, r"text/transformer/resblocks_(\d+)/"),
        text_heads=th,
        vocab_size=flat["text/token_embedding/embedding"].shape[0],
        context_length=flat["text/positional_embedding"].shape[0],
        embed_dim=flat["text/text_projection"].shape[1],
    )


def from_hf_state_dict(
    state_dict: Mapping[str, Any], heads: tuple[int, int] | None = None, what: str = "HF CLIP"
) -> tuple[dict, CLIPGeometry]:
    """transformers CLIPModel state dict (PyTorch names) -> (CLIP params, geometry)."""
    src = _Source(state_dict, what)
    flat: dict[str, np.ndarray] = {}
    v, t = "vision_model", "text_model"
    flat["visual/conv1/kernel"] = src.get(f"{v}.embeddings.patch_embedding.weight").transpose(
        2, 3, 1, 0
    )
    flat["visual/class_embedding"] = src.get(f"{v}.embeddings.class_embedding")
    flat["visual/positional_embedding"] = src.get(f"{v}.embeddings.position_embedding.weight")
    _norm(flat, "visual/ln_pre", src, f"{v}.pre_layrnorm")
    for i in range(_layer_count(src.tensors, rf"{v}\.encoder\.layers\.(\d+)\.")):
        _hf_block(flat, f"visual/transformer/resblocks_{i}", src, f"{v}.encoder.layers.{i}")
    _norm(flat, "visual/ln_post", src, f"{v}.post_layernorm")
    flat["visual/proj"] = src.get("visual_projection.weight").T
    flat["text/token_embedding/embedding"] = src.get(f"{t}.embeddings.token_embedding.weight")
    flat["text/positional_embedding"] = src.get(f"{t}.embeddings.position_embedding.weight")
    for i in range(_layer_count(src.tensors, rf"{t}\.encoder\.layers\.(\d+)\.")):
        _hf_block(flat, f"text/transformer/resblocks_{i}", src, f"{t}.encoder.layers.{i}")
    _norm(flat, "text/ln_final", src, f"{t}.final_layer_norm")
    flat["text/text_projection"] = src.get("text_projection.weight").T
    src.check_all_used()
    return _unflatten(flat), _geometry(flat, heads)


def to_hf_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """CLIP params ({"visual", "text"}) -> a transformers CLIPModel state dict: the inverse of
    from_hf_state_dict (numpy float32, contiguous, as safetensors wants)."""
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
    out: dict[str, np.ndarray] = {}
    v, t = "vision_model", "text_model"

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = flat[f"{src}/kernel"].T
        out[f"{dst}.bias"] = flat[f"{src}/bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = flat[f"{src}/scale"]
        out[f"{dst}.bias"] = flat[f"{src}/bias"]

    def block(src: str, dst: str) -> None:
        norm(f"{src}/ln_1", f"{dst}.layer_norm1")
        norm(f"{src}/ln_2", f"{dst}.layer_norm2")
        for ours, theirs in (
            ("q", "q_proj"),
            ("k", "k_proj"),
            ("v", "v_proj"),
            ("out", "out_proj"),
        ):
            linear(f"{src}/attn/{ours}", f"{dst}.self_attn.{theirs}")
        linear(f"{src}/fc", f"{dst}.mlp.fc1")
        linear(f"{src}/proj", f"{dst}.mlp.fc2")

    out[f"{v}.embeddings.patch_embedding.weight"] = flat["visual/conv1/kernel"].transpose(
        3, 2, 0, 1
    )
    out[f"{v}.embeddings.class_embedding"] = flat["visual/class_embedding"]
    out[f"{v}.embeddings.position_embedding.weight"] = flat["visual/positional_embedding"]
    norm("visual/ln_pre", f"{v}.pre_layrnorm")
    for i in range(_layer_count(flat, r"visual/transformer/resblocks_(\d+)/")):
        block(f"visual/transformer/resblocks_{i}", f"{v}.encoder.layers.{i}")
    norm("visual/ln_post", f"{v}.post_layernorm")
    out["visual_projection.weight"] = flat["visual/proj"].T
    out[f"{t}.embeddings.token_embedding.weight"] = flat["text/token_embedding/embedding"]
    out[f"{t}.embeddings.position_embedding.weight"] = flat["text/positional_embedding"]
    for i in range(_layer_count(flat, r"text/transformer/resblocks_(\d+)/")):
        block(f"text/transformer/resblocks_{i}", f"{t}.encoder.layers.{i}")
    norm("text/ln_final", f"{t}.final_layer_norm")
    out["text_projection.weight"] = flat["text/text_projection"].T
    return {k: np.ascontiguousarray(a) for k, a in out.items()}


def from_openai_state_dict(
    state_dict: Mapping[str, Any], prefix: str = "", what: str = "OpenAI CLIP"
) -> tuple[dict, CLIPGeometry]:
    """OpenAI CLIP state dict (`visual.*`, `transformer.*`, ...) -> (CLIP params, geometry).

    `prefix` selects a sub-dict (e.g. "clip_model_." in a CLIP-CAER checkpoint); other keys are
    ignored then.
    """
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    src = _Source(state_dict, what)
    flat: dict[str, np.ndarray] = {}
    flat["visual/conv1/kernel"] = src.get("visual.conv1.weight").transpose(2, 3, 1, 0)
    flat["visual/class_embedding"] = src.get("visual.class_embedding")
    flat["visual/positional_embedding"] = src.get("visual.positional_embedding")
    _norm(flat, "visual/ln_pre", src, "visual.ln_pre")
    for i in range(_layer_count(src.tensors, r"visual\.transformer\.resblocks\.(\d+)\.")):
        _openai_block(
            flat, f"visual/transformer/resblocks_{i}", src, f"visual.transformer.resblocks.{i}"
        )
    _norm(flat, "visual/ln_post", src, "visual.ln_post")
    flat["visual/proj"] = src.get("visual.proj")
    flat["text/token_embedding/embedding"] = src.get("token_embedding.weight")
    flat["text/positional_embedding"] = src.get("positional_embedding")
    for i in range(_layer_count(src.tensors, r"transformer\.resblocks\.(\d+)\.")):
        _openai_block(flat, f"text/transformer/resblocks_{i}", src, f"transformer.resblocks.{i}")
    _norm(flat, "text/ln_final", src, "ln_final")
    flat["text/text_projection"] = src.get("text_projection")
    src.check_all_used()
    return _unflatten(flat), _geometry(flat, None)


def from_flax_hf_params(
    tree: Mapping, heads: tuple[int, int] | None = None, what: str = "flax_model.msgpack"
) -> tuple[dict, CLIPGeometry]:
    """Params of transformers 4.x FlaxCLIPModel (nested dict) -> (CLIP params, geometry)."""
    if "params" in tree and len(tree) == 1:
        tree = tree["params"]
    src = _Source({k.replace("/", "."): v for k, v in _flatten(tree).items()}, what)
    flat: dict[str, np.ndarray] = {}
    v, t = "vision_model", "text_model"

    def block(dst: str, p: str) -> None:
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            _norm(flat, f"{dst}/{ours}", src, f"{p}.{theirs}", "scale", "bias")
        pairs = [
            (f"attn/{o}", f"self_attn.{n}")
            for o, n in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj"))
        ]
        for ours, theirs in pairs + [("fc", "mlp.fc1"), ("proj", "mlp.fc2")]:
            flat[f"{dst}/{ours}/kernel"] = src.get(f"{p}.{theirs}.kernel")
            flat[f"{dst}/{ours}/bias"] = src.get(f"{p}.{theirs}.bias")

    flat["visual/conv1/kernel"] = src.get(f"{v}.embeddings.patch_embedding.kernel")
    flat["visual/class_embedding"] = src.get(f"{v}.embeddings.class_embedding")
    flat["visual/positional_embedding"] = src.get(f"{v}.embeddings.position_embedding.embedding")
    _norm(flat, "visual/ln_pre", src, f"{v}.pre_layrnorm", "scale", "bias")
    for i in range(_layer_count(src.tensors, rf"{v}\.encoder\.layers\.(\d+)\.")):
        block(f"visual/transformer/resblocks_{i}", f"{v}.encoder.layers.{i}")
    _norm(flat, "visual/ln_post", src, f"{v}.post_layernorm", "scale", "bias")
    flat["visual/proj"] = src.get("visual_projection.kernel")
    flat["text/token_embedding/embedding"] = src.get(f"{t}.embeddings.token_embedding.embedding")
    flat["text/positional_embedding"] = src.get(f"{t}.embeddings.position_embedding.embedding")
    for i in range(_layer_count(src.tensors, rf"{t}\.encoder\.layers\.(\d+)\.")):
        block(f"text/transformer/resblocks_{i}", f"{t}.encoder.layers.{i}")
    _norm(flat, "text/ln_final", src, f"{t}.final_layer_norm", "scale", "bias")
    flat["text/text_projection"] = src.get("text_projection.kernel")
    src.check_all_used()
    return _unflatten(flat), _geometry(flat, heads)


# ----------------------------------------------------------------------------------------------
# Files


class _Inert:
    """Stands in for a class a checkpoint names but that is not needed (e.g. the authors'
    RecorderMeter): built without running any of the real class's code, its state discarded."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# numpy array reconstruction inside objects we discard (e.g. metric histories): inert as well.
_INERT_NUMPY = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
}


def _inert_globals(path: Path) -> list[tuple[type, str]]:
    """Stubs for the non-tensor classes of `path`; refuses if it names any function."""
    import torch

    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    refused = [
        g
        for g in unsafe
        if g not in _INERT_NUMPY
        and not g.startswith("numpy.dtypes.")
        and not g.rsplit(".", 1)[-1][:1].isupper()
    ]
    if refused:
        raise WeightsError(
            f"{path}: refused to load: it names the callable(s) {refused}, which a weights file "
            "does not need (torch.load weights_only=True; only tensors, plain containers and "
            "inert stand-ins for other classes are read)"
        )
    return [(_Inert, g) for g in unsafe]


def load_torch_file(path: str | os.PathLike, *, inert_classes: bool = False) -> Any:
    """A torch checkpoint, never unpickling arbitrary objects.

    Plain `torch.save` files go through `torch.load(weights_only=True)`: only tensors and plain
    containers; anything else is refused. With `inert_classes`, objects of other classes (the
    authors' checkpoints hold a `RecorderMeter`) are replaced by inert stand-ins that run no code;
    a file naming any other callable (a function: the usual pickle payload) is still refused.
    OpenAI's released CLIP .pt files are TorchScript archives, which weights_only refuses; those
    are read with `torch.jit.load`, whose deserialiser builds TorchScript modules and does not
    call pickled Python callables.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"{path}: no such file; check the path")
    stubs = _inert_globals(path) if inert_classes and zipfile.is_zipfile(path) else []
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(stubs):
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            # Damaged bytes read as an odd pickle protocol; the error below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as e:
        if "TorchScript" not in str(e):
            raise _corrupt(path, e) from e
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not an object refused by name: bytes that are no pickle
            raise _corrupt(path, e) from e
        raise WeightsError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"(torch.load weights_only=True): {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        # Past the two cases above, any failure means bytes torch cannot read as a checkpoint. A
        # partial download raises EOFError, OSError (Errno 22 on a seek), KeyError, ValueError or
        # BadZipFile; other damaged bytes reach the weights-only unpickler, which can raise almost
        # anything (IndexError on an unbalanced mark, for one in 16 random files).
        raise _corrupt(path, e) from e


def _corrupt(path: Path, error: Exception) -> WeightsError:
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return WeightsError(
        f"{path}: truncated or corrupt torch checkpoint ({path.stat().st_size} bytes; "
        f"{type(error).__name__}: {first}); download or copy it again"
    )


def _hf_heads(config_path: Path) -> tuple[tuple[int, int], Any]:
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(config_path.parent))
    geometry = CLIPGeometry.from_hf_config(config)
    return (geometry.vision_heads, geometry.text_heads), geometry


def _load_hf_folder(folder: Path) -> tuple[dict, CLIPGeometry]:
    heads, config_geometry = _hf_heads(folder / "config.json")
    if (folder / "model.safetensors").exists():
        from safetensors.numpy import load_file

        f = folder / "model.safetensors"
        sd = load_file(str(f))
    elif (folder / "pytorch_model.bin").exists():
        f = folder / "pytorch_model.bin"
        sd = load_torch_file(f)
    elif (folder / "flax_model.msgpack").exists():
        return _load_msgpack(folder / "flax_model.msgpack")
    else:
        raise WeightsError(
            f"{folder} has config.json but no model.safetensors, pytorch_model.bin or "
            "flax_model.msgpack"
        )
    params, geometry = from_hf_state_dict(sd, heads, what=str(f))
    _check_geometry(geometry, config_geometry, f)
    return params, geometry


def _load_msgpack(path: Path) -> tuple[dict, CLIPGeometry]:
    from flax import serialization

    tree = serialization.msgpack_restore(path.read_bytes())
    heads, config_geometry = None, None
    if (path.parent / "config.json").exists():
        heads, config_geometry = _hf_heads(path.parent / "config.json")
    params, geometry = from_flax_hf_params(tree, heads, what=str(path))
    if config_geometry is not None:
        _check_geometry(geometry, config_geometry, path)
    return params, geometry


def _check_geometry(found: CLIPGeometry, config: CLIPGeometry, where: Any) -> None:
    if found != config:
        raise WeightsError(f"{where}: tensors imply {found} but config.json says {config}")


def load_clip_weights(source: str | os.PathLike) -> tuple[dict, CLIPGeometry]:
    """CLIP params ({"visual", "text"}, numpy float32) and their geometry, from any format."""
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").exists():
            return _load_hf_folder(path)
        if (path / "flax_model.msgpack").exists():
            return _load_msgpack(path / "flax_model.msgpack")
    elif path.is_file():
        if path.suffix == ".msgpack":
            return _load_msgpack(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            sd = load_torch_file(path)
            if isinstance(sd, Mapping) and "state_dict" in sd:
                sd = sd["state_dict"]
            if isinstance(sd, Mapping) and "visual.conv1.weight" in sd:
                return from_openai_state_dict(sd, what=str(path))
            if isinstance(sd, Mapping) and "vision_model.embeddings.patch_embedding.weight" in sd:
                return from_hf_state_dict(sd, what=str(path))
            raise WeightsError(
                f"{path}: not a CLIP state dict (no visual.conv1.weight nor "
                "vision_model.embeddings.patch_embedding.weight); accepted formats: "
                + "; ".join(FORMATS)
            )
    elif hub.is_hub_id(str(source)):
        return _load_hf_folder(_download(str(source)))
    else:
        raise errors.MissingInputError(
            f"CLIP weights {errors.named_path(source)}: no such file or folder; accepted: "
            + "; ".join(FORMATS)
        )
    raise WeightsError(
        f"cannot read CLIP weights from {str(source)!r}; accepted: " + "; ".join(FORMATS)
    )


def _download(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors weights (else pytorch_model.bin) of a hub id."""
    from huggingface_hub import snapshot_download

    common = [
        "config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer*.json",
        "special_tokens_map.json",
    ]

    def load(local: bool) -> Path:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=common + ["model.safetensors"], local_files_only=local
            )
        )
        if (folder / "model.safetensors").exists():
            return folder
        return Path(
            snapshot_download(
                repo_id, allow_patterns=common + ["pytorch_model.bin"], local_files_only=local
            )
        )

    return hub.fetch(repo_id, "config.json", "config.model.clip.source", load)


def load_clip_params(source: str | os.PathLike, geometry: CLIPGeometry | None = None) -> dict:
    """`load_clip_weights`, checked against the expected geometry (error names both)."""
    params, found = load_clip_weights(source)
    if geometry is not None and found != geometry:
        diffs = [
            f"{k}: config {getattr(geometry, k)} vs weights {getattr(found, k)}"
            for k in geometry.__dataclass_fields__
            if getattr(geometry, k) != getattr(found, k)
        ]
        raise WeightsError(
            f"CLIP weights {str(source)!r} do not match config.model.clip: " + "; ".join(diffs)
        )
    return params


def merge_checked(target: Mapping, loaded: Mapping, prefix: str) -> dict:
    """`loaded` as a tree of the same structure as `target`, float32; names any mismatch."""
    t_flat, l_flat = _flatten(target), _flatten(loaded)
    for k in t_flat:
        if k not in l_flat:
            raise WeightsError(
                f"missing key {prefix}/{k} (expected shape {tuple(t_flat[k].shape)})"
            )
    for k in l_flat:
        if k not in t_flat:
            raise WeightsError(f"unexpected key {prefix}/{k} with shape {tuple(l_flat[k].shape)}")
        if tuple(l_flat[k].shape) != tuple(t_flat[k].shape):
            raise WeightsError(
                f"wrong shape for {prefix}/{k}: checkpoint {tuple(l_flat[k].shape)}, "
                f"model {tuple(t_flat[k].shape)}"
            )
    return _unflatten({k: np.asarray(v, np.float32) for k, v in l_flat.items()})
