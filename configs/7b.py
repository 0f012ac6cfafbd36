"""LaVi-7B: Qwen2-7B-Instruct + SigLIP-so400m/14 at 384, AnyRes up to 9 grid crops + base crop,
32 video frames (the LLaVA-OneVision-7B shapes), with a LLaVA-OneVision-style recipe.

A run needs a converted starting checkpoint (config.init_from), LLaVA-format data
(config.data.train_mixture) and the Qwen2 tokenizer (config.data.tokenizer); `python -m
lavi_jax.main --config=configs/7b.py --workdir=DIR` without them prints the commands that make
them. README, "Training LaVi-7B".
"""

from lavi_jax import config as lavi_config


def get_config(arg=None):
  del arg
  config = lavi_config.base_config()
  # Exactly what convert.from_hf reads from Qwen2-7B-Instruct's config.json (head_dim included),
  # so that init_from's stored model matches this one.
  config.model.llm.update(
      arch='qwen2', vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
      num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      qkv_bias=True, tie_word_embeddings=False)
  config.model.projector.update(ctx_dim=1024, max_frames=32)
  config.model.viln.update(heads=8, head_dim=64, mlp_dim=1024)
  # bfloat16 compute over float32 parameters (AdamW's master copy); every scanned LLM layer
  # recomputed in the backward pass ('full' remat): the least activation memory.
  config.model.update(dtype='bfloat16', param_dtype='float32', scan_layers=True, remat='full')
  config.data.update(
      # AnyRes: the base crop + up to 9 grid crops; 32 frames per video.
      max_crops=10, num_frames=32, chat_template='chatml',
      # The vision tower encodes 8 crops/frames per row on average (frame pools): enough for
      # the AnyRes images of LLaVA-OneVision's single-image data (a 2 x 2 or 2 x 3 grid + base
      # crop is common) and a 32-frame video in a group of 8 rows. The metrics show how full
      # the pools were (visual_slot_use) and how many items were trimmed to fit
      # (num_visual_trimmed); set it to your data.
      frames_per_row=8,
      # The text only: LaVi's visual tokens never enter the sequence.
      max_text_len=2048,
      # Rows per device of each step, for finetune-scale pods (global batch = 8 x chips, 512 on
      # 64 chips). `python -m lavi_jax.compile` tells whether it fits a topology's memory; if
      # not, lower it and raise train.accumulation_steps to keep the global batch.
      per_device_batch_size=8,
      # No held-out synthetic evaluation at the end (the shapes data is the tiny demo's).
      eval_mixture='')
  # Both stages read data.train_mixture. Steps assume a global batch of 512: align is one epoch
  # of LLaVA's 558K captions, finetune about one of LLaVA-OneVision's 3.2M single-image mix;
  # scale them with the pod and the data. Warmup: 3% of each stage, as LLaVA.
  config.train.stages = dict(
      # The vision-to-LLM bridge alone (projector, frame-index embedding, conditioners), at
      # LLaVA's projector rate: the conditioners start at zero, the rest of LaVi is pretrained.
      align=dict(steps=1100, trainable=lavi_config.ALIGN_PARAMS, learning_rate=1e-3,
                 warmup_steps=33, lr_scale='', lora=lavi_config.lora_config(rank=0)),
      # Everything, at LLaVA-OneVision's rates: 1e-5 for the LLM and the bridge, the ViT at a
      # fifth of it (2e-6).
      finetune=dict(steps=6500, trainable=lavi_config.ALIGN_PARAMS + '|^llm/|^vit/',
                    learning_rate=1e-5, warmup_steps=200, lr_scale='^vit/=0.2',
                    # LoRA / QLoRA instead (lavi_jax/train/lora.py): lora.rank=64 (and
                    # lora.quantize=int8), with trainable=ALIGN_PARAMS
                    lora=lavi_config.lora_config(rank=0)),
  )
  config.train.weight_decay = 0.0  # as LLaVA
  config.mesh.update(data=1, fsdp=-1, tensor=1, rules='fsdp')  # parameters over all chips
  # A checkpoint with optimizer state is ~100 GB (float32 parameters and two Adam moments): every
  # 500 steps, keeping two. Preemption and each stage's end save too.
  config.checkpoint.update(every=500, keep=2)
  # Benchmarks during training stay off (config.eval.tasks, README "Evaluation").
  return config
