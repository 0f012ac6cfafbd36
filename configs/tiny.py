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
  model.scan_layers = False  # 4 unrolled layers step ~10% faster on CPU than nn.scan
  model.llm.update(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                   num_heads=4, num_kv_heads=2, rope_theta=10_000.0, tie_word_embeddings=True)
  # 48 px in 16 px patches: one visual token per cell of the data's 3 x 3 grid (9 per frame).
  # No video pooling: a 3 x 3 grid has nothing to spare.
  model.vision.update(image_size=48, patch_size=16, hidden_size=96, intermediate_size=256,
                      num_layers=3, num_heads=4, video_pool=1)
  model.projector.update(ctx_dim=96, max_frames=16)
  # Also modulate the final norm: its deltas act on the answer logits directly.
  model.viln.update(heads=4, head_dim=32, mlp_dim=128, sublayers=('attn', 'mlp', 'final'))
  # max_text_len: the longest synthetic conversation is 32 tokens. num_frames: the first and
  # last frames of a motion video already tell its direction.
  # frames_per_row: a fifth of the records are 2-frame videos, the rest 1-crop images, so 16 rows
  # need ~19 of the 24 slots the ViT encodes per batch (32 if every row were padded to 2).
  config.data.update(train_mixture='synthetic:train:20000', eval_mixture='synthetic:test:512',
                     batch_size=16, max_text_len=32, max_crops=1, max_images=1, num_frames=2,
                     frames_per_row=1.5, num_workers=0, read_threads=1)
  config.data.synthetic.update(image_size=48, video_frames=8, video_fraction=0.2)
  # From scratch, everything trains together in one stage. Per-group rates (lr_scale):
  # - embed_tokens x0.05: Adam moves every row ~lr per step, which soon swamps the 0.02 init
  #   and makes question words (never targets) look alike; slowed, 'red' vs 'blue' and
  #   'circle' vs 'square' stay apart, which yes/no and colour questions need.
  # - conditioners, visual K/V and ViT position embedding x2: the vision-to-text bridge starts
  #   at zero (and positions at 0.02), so it is the slow part to learn.
  # - patch_embedding x0.25: its 768 inputs (a 16 x 16 x 3 patch, mostly constant white) make
  #   full-rate Adam steps blow up the ViT features and kill the projector's GELUs.
  config.train.stage_order = ('train',)
  config.train.stages = dict(train=dict(
      steps=5000, trainable='.*', learning_rate=2e-3, warmup_steps=100,
      lr_scale='embed_tokens=0.05,conditioner|viln_context|position_embedding=2,'
               'patch_embedding=0.25',
      lora=lavi_config.lora_config(rank=0)))
  config.train.weight_decay = 0.01
  config.train.log_every = 25
  config.checkpoint.every = 1000  # fewer saves: each costs time in a ~6 minute run
  return config
