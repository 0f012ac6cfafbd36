"""Tiny random Hugging Face models for the conversion tests (torch/transformers imported lazily)."""

from __future__ import annotations

from lavi_jax import config as lavi_config

VOCAB = 128
IMAGE_TOKEN = 5


def text_config(arch='qwen2', layers=2, heads=4, kv_heads=2, tie=False, **kw):
  import transformers
  cls = {'qwen2': transformers.Qwen2Config, 'llama': transformers.LlamaConfig}[arch]
  return cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
             rope_theta=10000.0, rms_norm_eps=1e-5, **kw)


def vision_config(layers=2):
  import transformers
  return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=4,
                                         image_size=32, patch_size=8)


def randomize(model, seed=0):
  """Every parameter random (norm scales around 1), so that no mapping hides behind 0 or 1."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      is_norm = 'norm' in name and name.endswith('weight')
      param.copy_(1 + 0.2 * noise if is_norm else 0.2 * noise)
  return model.eval()


def save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return path


def base_model(**overrides):
  """A small LaVi model config for the parts that HF checkpoints do not set."""
  model = lavi_config.base_model_config()
  model.dtype = 'float32'
  model.image_token_id = IMAGE_TOKEN
  model.video_token_id = IMAGE_TOKEN + 1
  model.vision.update(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4)
  model.projector.update(ctx_dim=32, max_frames=4)
  model.viln.update(heads=2, head_dim=8, mlp_dim=32)
  model.update(overrides)
  return model
