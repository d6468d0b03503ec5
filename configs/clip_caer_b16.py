"""The paper's setting on CLIP ViT-B/16 (16 px patches: 196 tokens per frame instead of 49).

  python -m caer_jax.train --config=configs/clip_caer_b16.py --workdir=runs/b16 \
      --config.data.data_dir=/data/tfds

Everything but the backbone is configs/clip_caer_b32.py (its variants work here too:
`configs/clip_caer_b16.py:face`). About 4x the image-encoder FLOPs of B/32, so bfloat16 compute
(float32 parameters and optimizer state), rematerialised ViT blocks and parameters split over
every device (FSDP). On devices too small for batch 8, raise config.train.grad_accum_steps (it
must divide the batch, and batch / grad_accum_steps must divide over the devices).
"""

import ml_collections

from caer_jax import config_files

clip_caer_b32 = config_files.sibling(__file__, "clip_caer_b32")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = clip_caer_b32.get_config(arg)
    c.model.clip.source = "openai/clip-vit-base-patch16"
    c.model.clip.patch_size = 16
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every device holds 1/N of the large matrices and of the batch
    return c
