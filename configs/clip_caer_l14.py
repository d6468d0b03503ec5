"""The paper's setting on CLIP ViT-L/14 (435M parameters in all; 256 tokens per frame).

  python -m caer_jax.train --config=configs/clip_caer_l14.py --workdir=runs/l14 \
      --config.data.data_dir=/data/tfds
  # several hosts (TPU pod, SLURM): see README "Scaling out", e.g.
  sbatch --nodes=2 launch/slurm_gpu.sbatch --config=configs/clip_caer_l14.py --workdir=/shared/runs/l14

Everything but the backbone is configs/clip_caer_b32.py (variants: `clip_caer_l14.py:face`, ...).
bfloat16 compute with float32 parameters and optimizer state, rematerialised ViT blocks and every
large matrix (and its momentum) split over all devices (FSDP), so that the model fits where a
replicated copy would not. On devices too small for batch 8, raise
config.train.grad_accum_steps (it must divide the batch, and batch / grad_accum_steps must divide
over the devices).
"""

import ml_collections

from caer_jax import config_files

clip_caer_b32 = config_files.sibling(__file__, "clip_caer_b32")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = clip_caer_b32.get_config(arg)
    c.model.clip.source = "openai/clip-vit-large-patch14"
    c.model.clip.patch_size = 14
    c.model.clip.vision_width = 1024
    c.model.clip.vision_layers = 24
    c.model.clip.vision_heads = 16
    c.model.clip.text_width = 768
    c.model.clip.text_layers = 12
    c.model.clip.text_heads = 12
    c.model.clip.embed_dim = 768
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every device holds 1/N of the large matrices and of the batch
    return c
