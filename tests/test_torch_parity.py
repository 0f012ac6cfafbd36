"""`convert.torch_lavi` on `convert.to_torch` exports: the logits and greedy tokens of the JAX
model; bf16 exports; the language part as a plain Qwen2ForCausalLM; concat as LLaVA."""

import json

import jax
import numpy as np
import pytest

from helpers import random_params, tiny_config
from lavi_jax.convert import from_hf, to_torch
from lavi_jax.inference import decode
from lavi_jax.models import LaVi
from test_to_torch import VARIANTS

IMAGE, VIDEO = 1, 2  # configs/tiny.py's placeholder ids


def export(tmp_path, variant, dtype=None, params=None):
  """(model config, JAX params, export folder) of random parameters."""
  model = tiny_config(**VARIANTS[variant]).model
  params = random_params(model, 0, scale=0.1) if params is None else params(model)
  folder = tmp_path / 'jax'
  from_hf.save_converted(folder, model, jax.tree.map(np.asarray, params))
  to_torch.export(str(folder), str(tmp_path / 'torch'), dtype)
  return model, params, tmp_path / 'torch'


def inputs(seed=0):
  """Two right-padded prompts; row 0: an image of 2 crops, then a video; row 1 (3 padding
  tokens): the video first, then the image. The second video has 2 of its 3 frames."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(8, 512, (2, 10))
  mask = np.ones((2, 10), bool)
  mask[1, 7:] = False
  ids[0, [1, 5]] = IMAGE, VIDEO
  ids[1, [0, 3]] = VIDEO, IMAGE
  ids[~mask] = 0
  images = dict(pixel_values=rng.uniform(-1, 1, (2, 2, 64, 64, 3)).astype(np.float32),
                frame_item=np.zeros((2, 2), np.int32))
  videos = dict(pixel_values=rng.uniform(-1, 1, (2, 3, 64, 64, 3)).astype(np.float32),
                frame_item=np.ones((2, 3), np.int32),
                frame_mask=np.array([[True] * 3, [True, True, False]]))
  return ids, mask, images, videos


def torch_logits(torch_model, ids, mask, images=None, videos=None):
  import torch
  as_torch = lambda d: None if d is None else {k: torch.tensor(v) for k, v in d.items()}
  with torch.no_grad():
    return torch_model(ids, mask, as_torch(images), as_torch(videos)).float().numpy()


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_logits_match_jax(tmp_path, variant):
  from lavi_jax.convert import torch_lavi
  model, params, folder = export(tmp_path, variant)
  torch_model = torch_lavi.LaVi.from_pretrained(folder)
  ids, mask, images, videos = inputs()
  ours = np.asarray(jax.jit(LaVi(model).apply)({'params': params}, ids, mask, images=images,
                                               videos=videos))
  ref = torch_logits(torch_model, ids, mask, images, videos)
  np.testing.assert_allclose(ref[mask], ours[mask], rtol=0, atol=1e-4)


@pytest.mark.parametrize('variant', ['attention', 'concat'])
def test_greedy_generate_matches_jax(tmp_path, variant):
  from lavi_jax.convert import torch_lavi
  model, params, folder = export(tmp_path, variant)
  torch_model = torch_lavi.LaVi.from_pretrained(folder)
  ids, mask, images, videos = inputs(1)
  stop = 7
  out = decode.generate(model, params, ids, mask, images, videos, max_new_tokens=8,
                        stop_ids=(stop,))
  tokens, length = torch_model.generate(ids, mask, images, videos, max_new_tokens=8,
                                        stop_ids=(stop,))
  np.testing.assert_array_equal(tokens.numpy(), out.tokens)
  np.testing.assert_array_equal(length.numpy(), out.length)
  sampled, _ = torch_model.generate(ids, mask, images, videos, max_new_tokens=4, temperature=0.8,
                                    top_k=20, top_p=0.9)
  assert sampled.shape == (2, 4) and (sampled < model.llm.vocab_size).all()


def zero_conditioners(model):
  """Random parameters, the conditioners' last projections zero (as initialised)."""
  params = random_params(model, 0, scale=0.1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if any(getattr(k, 'key', None) == 'o_proj' for k in path) and any(
          getattr(k, 'key', None) == 'conditioner' for k in path) else x, params)


def test_bf16_export_and_plain_qwen2(tmp_path):
  """bf16 logits close to JAX's (float32); with zero conditioners the language part alone, as a
  Qwen2ForCausalLM, gives LaVi's logits (float32: equal, bf16: as close)."""
  import torch
  import transformers
  from lavi_jax.convert import torch_lavi
  model, params, folder = export(tmp_path, 'attention', 'bfloat16', zero_conditioners)
  to_torch.export(str(tmp_path / 'jax'), str(tmp_path / 'f32'))
  ids, mask, images, videos = inputs()
  ours = np.asarray(jax.jit(LaVi(model).apply)({'params': params}, ids, mask, images=images,
                                               videos=videos))[mask]
  tolerance = 0.05 * np.abs(ours).max()  # bf16 weights and activations
  lavi = torch_lavi.LaVi.from_pretrained(folder)
  assert lavi.model.embed_tokens.weight.dtype == torch.bfloat16
  assert np.abs(torch_logits(lavi, ids, mask, images, videos)[mask] - ours).max() < tolerance

  text_config = transformers.Qwen2Config(**json.loads((folder / 'config.json').read_text())[
      'text_config'])
  for path, dtype, atol in ((folder, torch.bfloat16, tolerance), (tmp_path / 'f32',
                                                                  torch.float32, 1e-4)):
    qwen2 = transformers.Qwen2ForCausalLM.from_pretrained(path, config=text_config, dtype=dtype)
    with torch.no_grad():
      plain = qwen2(input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()
    np.testing.assert_allclose(plain[mask], ours, rtol=0, atol=atol)


def test_concat_export_is_llava(tmp_path):
  import torch
  import transformers

  def no_frame_index(model):  # LLaVA has none (it is zero when imported from LLaVA)
    params = random_params(model, 0, scale=0.1)
    params['frame_index']['embedding'] *= 0
    return params

  model, params, folder = export(tmp_path, 'concat', params=no_frame_index)
  llava = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
  ids, mask, images, _ = inputs()
  ids[0, 5], ids[1, 0] = 9, 9  # one image per row, one crop each; no video
  images = dict(pixel_values=images['pixel_values'][:, :1])
  ours = np.asarray(jax.jit(LaVi(model).apply)({'params': params}, ids, mask, images=images))
  per_image = (model.vision.image_size // model.vision.patch_size) ** 2
  rows = [np.concatenate([[t] * (per_image if t == IMAGE else 1) for t in row[m]])
          for row, m in zip(ids, mask)]
  hf_ids = np.zeros((2, max(map(len, rows))), np.int64)
  hf_mask = np.zeros_like(hf_ids)
  for b, row in enumerate(rows):
    hf_ids[b, :len(row)], hf_mask[b, :len(row)] = row, 1
  with torch.no_grad():
    ref = llava(input_ids=torch.tensor(hf_ids), attention_mask=torch.tensor(hf_mask),
                pixel_values=torch.tensor(images['pixel_values'][:, 0].transpose(0, 3, 1, 2))
                ).logits.numpy()
  for b, row in enumerate(rows):
    last = np.cumsum([per_image if t == IMAGE else 1 for t in ids[b][mask[b]]]) - 1
    np.testing.assert_allclose(ref[b, last], ours[b][mask[b]], rtol=0, atol=1e-4)


def test_unknown_config_is_refused(tmp_path):
  from lavi_jax.convert import torch_lavi
  _, _, folder = export(tmp_path, 'mlp')
  config = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps({**config, 'model_type': 'qwen2'}))
  with pytest.raises(ValueError, match="model_type='qwen2' and a lavi_config"):
    torch_lavi.LaVi.from_pretrained(folder)
  config['text_config']['model_type'] = 'mistral'
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match="text_config.model_type='mistral'"):
    torch_lavi.LaVi.from_pretrained(folder)
  config['text_config']['model_type'] = 'qwen2'
  config['lavi_config']['viln']['mlp_dim'] = 64
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(RuntimeError, match=r'conditioners.layers.0.input_layernorm.fc1.weight: '
                     r'copying a param with shape torch.Size\(\[128, 224\]\)'):
    torch_lavi.LaVi.from_pretrained(folder)
