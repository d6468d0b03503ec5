"""Export of the Flax CLIP as a Hugging Face CLIP folder.

    write_folder(folder, params, geometry, tokenizer_dir=..., ...)

The folder is what `openai/clip-vit-base-patch32` holds: config.json, model.safetensors (the
transformers CLIPModel state dict, clip_weights.to_hf_state_dict), the tokenizer's files
(vocab.json, merges.txt, tokenizer_config.json, ...) and preprocessor_config.json. Both
`config.model.clip.source=<folder>` (clip_weights._load_hf_folder, tokenizer.load_tokenizer) and
`transformers.CLIPModel.from_pretrained(folder)` load it.

Pixels: CLIP-CAER feeds the encoder [0, 1] pixels (config.model.pixel_normalization "none", the
authors' input). Weights trained on CLIP-normalised pixels are exported with that normalisation
folded into the patch embedding (the kernel divided by the channel std, and the mean's term added
to the patch tokens' position embeddings; exact up to rounding), so the exported model takes
[0, 1] pixels, and preprocessor_config.json says so (mean 0, std 1).

FINGERPRINT_FILE records what the weights were made from; it is written last, into a folder that
is renamed into place, so a folder with a fingerprint is always complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from caer_jax.models import caer, clip_weights
from caer_jax.models.clip import CLIPGeometry

FINGERPRINT_FILE = "caer_jax_pretrain.json"


def fold_pixel_normalization(params: dict, mean, std) -> dict:
    """Params that give on x the features `params` give on (x - mean) / std (per channel)."""
    visual = dict(params["visual"])
    kernel = np.asarray(visual["conv1"]["kernel"], np.float64)  # [p, p, 3, width]
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scaled = kernel / std[None, None, :, None]
    shift = -np.einsum("hwcd,c->d", scaled, mean)  # added to every patch token
    pos = np.asarray(visual["positional_embedding"], np.float64).copy()
    pos[1:] += shift  # row 0 is the class token, which no patch reaches
    visual["conv1"] = {**visual["conv1"], "kernel": scaled.astype(np.float32)}
    visual["positional_embedding"] = pos.astype(np.float32)
    return {**params, "visual": visual}


def write_folder(
    folder: str | os.PathLike,
    params: dict,
    geometry: CLIPGeometry,
    *,
    tokenizer_dir: str | os.PathLike,
    pixel_normalization: str,
    logit_scale: float,
    fingerprint: str,
) -> Path:
    """Writes the Hugging Face folder of CLIP `params` ({"visual", "text"}); see the module
    docstring. Replaces a previous folder only once the new one is complete."""
    from safetensors.numpy import save_file
    from transformers import CLIPImageProcessor, CLIPTokenizer

    folder = Path(folder)
    if pixel_normalization == "clip":
        params = fold_pixel_normalization(params, caer.CLIP_PIXEL_MEAN, caer.CLIP_PIXEL_STD)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config = geometry.to_hf_config()
    hf_config.logit_scale_init_value = math.log(logit_scale)
    hf_config.save_pretrained(str(tmp))
    tensors = clip_weights.to_hf_state_dict(params)
    tensors["logit_scale"] = np.asarray(math.log(logit_scale), np.float32)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # transformers 5 saves tokenizer.json and tokenizer_config.json; vocab.json and merges.txt
    # are what older readers (and OpenAI's folders) have.
    CLIPTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    size = geometry.image_size
    CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    ).save_pretrained(str(tmp))
    record = {
        "fingerprint": fingerprint,
        "pixels": "[0, 1] (config.model.pixel_normalization = 'none')",
    }
    (tmp / FINGERPRINT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def read_fingerprint(folder: str | os.PathLike) -> str | None:
    """The fingerprint of an exported folder; None when there is none (or no folder)."""
    try:
        return json.loads((Path(folder) / FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None
