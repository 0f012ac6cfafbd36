"""LaVi-7B: Qwen2-7B + SigLIP-so400m/14 at 384, AnyRes up to 9 grid crops + base crop,
32 video frames (the LLaVA-OneVision-7B shapes)."""

from lavi_jax import config as lavi_config


def get_config(arg=None):
  del arg
  config = lavi_config.base_config()
  config.model.llm.update(
      arch='qwen2', vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
      num_heads=28, num_kv_heads=4, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
      tie_word_embeddings=False)
  config.model.projector.update(ctx_dim=1024, max_frames=32)
  config.model.viln.update(heads=8, head_dim=64, mlp_dim=1024)
  # AnyRes: the base crop + up to 9 grid crops; set data.tokenizer to the Qwen2 tokenizer.json.
  config.data.update(max_crops=10, num_frames=32, chat_template='chatml')
  config.mesh.update(data=1, fsdp=-1, tensor=1, rules='fsdp')
  return config
