"""LaVi-0.5B: Qwen2-0.5B + SigLIP-so400m/14 at 384 (the LLaVA-OneVision-0.5B shapes)."""

from lavi_jax import config as lavi_config


def get_config(arg=None):
  del arg
  config = lavi_config.base_config()  # the defaults are these shapes
  config.model.projector.ctx_dim = 1024
  return config
