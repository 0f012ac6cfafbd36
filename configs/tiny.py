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
  config.data.update(train_mixture='synthetic:train:20000', eval_mixture='synthetic:test:512',
                     batch_size=16, max_text_len=64, max_crops=1, max_images=1, num_frames=4,
                     num_workers=0, read_threads=1)
  config.data.synthetic.update(image_size=64, video_frames=8, video_fraction=0.2)
  # From scratch, everything trains together in one stage.
  config.train.stage_order = ('train',)
  config.train.stages = dict(train=dict(steps=1500, trainable='.*', learning_rate=2e-3,
                                        warmup_steps=100, lr_scale=''))
  config.train.weight_decay = 0.01
  config.train.log_every = 25
  config.checkpoint.every = 250
  return config
