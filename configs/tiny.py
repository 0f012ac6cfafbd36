"""Tiny LaVi for CPU: trains on the built-in synthetic data in minutes."""

from lavi_jax import config as lavi_config


def get_config(arg=None):
  del arg
  config = lavi_config.base_config()
  model = config.model
  model.image_token_id = 1
  model.video_token_id = 2
  model.dtype = 'float32'
  model.remat = 'none'
  model.llm.update(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                   num_heads=4, num_kv_heads=2, rope_theta=10_000.0, tie_word_embeddings=True)
  model.vision.update(image_size=64, patch_size=8, hidden_size=96, intermediate_size=256,
                      num_layers=3, num_heads=4)
  model.projector.update(ctx_dim=96, max_frames=16)
  model.viln.update(heads=4, head_dim=32, mlp_dim=128)
  return config
