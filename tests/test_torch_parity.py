"""The PyTorch LaVi of `convert.to_torch` exports (convert/hf_lavi/modeling_lavi.py, the code
shipped in the export): the logits and greedy tokens of the JAX model for every conditioner and
LLM, with multi-crop images and videos; bf16 exports; the language part as a plain
Qwen2ForCausalLM / LlamaForCausalLM; concat as LLaVA. (tests/test_hf_export.py loads an export
with transformers alone, processor included.)"""

import json
import shutil

import jax
import numpy as np
import pytest

from lavi_jax.convert import from_hf, to_torch
from lavi_jax.inference import decode
from lavi_jax.models import LaVi
from tests.helpers import EXPORT_VARIANTS as VARIANTS
from tests.helpers import random_params, tiny_config

IMAGE, VIDEO = 1, 2  # configs/tiny.py's placeholder ids


def random(model):
  return random_params(model, 0, scale=0.1)


def zero_conditioners(model):
  """Random parameters, the conditioners' last projections zero (as initialised)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if any(getattr(k, 'key', None) == 'o_proj' for k in path) and any(
          getattr(k, 'key', None) == 'conditioner' for k in path) else x, random(model))


def no_frame_index(model):
  """Random parameters, no frame-index embedding (LLaVA has none; zero when imported from it)."""
  params = random(model)
  params['frame_index']['embedding'] *= 0
  return params


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """get(variant, dtype=None, params=random) -> (model config, JAX params, export folder), each
  exported once per module (the tests only read them)."""
  made = {}

  def get(variant, dtype=None, params=random):
    key = (variant, params.__name__)
    if key not in made:
      model = tiny_config(**VARIANTS[variant]).model
      folder = tmp_path_factory.mktemp(f'{variant}_{params.__name__}')
      made[key] = model, params(model), folder
      from_hf.save_converted(folder / 'jax', model, jax.tree.map(np.asarray, made[key][1]))
    model, values, folder = made[key]
    out = folder / (dtype or 'stored')
    if not out.exists():
      to_torch.export(str(folder / 'jax'), str(out), dtype)
    return model, values, out

  return get


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


def load(folder, dtype=None):
  """The export as LaViForConditionalGeneration (in its stored dtype unless given)."""
  from lavi_jax.convert.hf_lavi.modeling_lavi import LaViForConditionalGeneration
  return LaViForConditionalGeneration.from_pretrained(folder, dtype=dtype or 'auto').eval()


def torch_inputs(ids, mask, images=None, videos=None):
  """JAX-style inputs (channels-last pixels) -> the PyTorch model's keyword arguments."""
  import torch
  inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
  for kind, names in ((images, ('pixel_values', 'image_frame_mask', 'image_frame_item')),
                      (videos, ('pixel_values_videos', 'video_frame_mask', 'video_frame_item'))):
    if kind is not None:
      inputs[names[0]] = torch.tensor(kind['pixel_values']).permute(0, 1, 4, 2, 3)
      for key, name in zip(('frame_mask', 'frame_item'), names[1:]):
        if key in kind:
          inputs[name] = torch.tensor(kind[key])
  return inputs


def torch_logits(torch_model, ids, mask, images=None, videos=None):
  import torch
  with torch.no_grad():
    return torch_model(**torch_inputs(ids, mask, images, videos)).logits.float().numpy()


def jax_logits(model, params, ids, mask, images=None, videos=None):
  return np.asarray(jax.jit(LaVi(model).apply)({'params': params}, ids, mask, images=images,
                                               videos=videos))


VILN_VARIANTS = [v for v in VARIANTS if VARIANTS[v].get('fusion') != 'concat']


@pytest.mark.parametrize('variant', VILN_VARIANTS)
def test_logits_match_jax(exports, variant):
  model, params, folder = exports(variant)
  ids, mask, images, videos = inputs()
  ours = jax_logits(model, params, ids, mask, images, videos)
  ref = torch_logits(load(folder), ids, mask, images, videos)
  np.testing.assert_allclose(ref[mask], ours[mask], rtol=0, atol=1e-4)


def left_padded(ids, mask):
  """Right-padded rows -> the same rows left-padded (as transformers generates)."""
  order = np.argsort(mask, axis=1, kind='stable')  # padding first, tokens in order
  return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


@pytest.mark.parametrize('variant', ['attention', 'llama'])
def test_greedy_generate_matches_jax(exports, variant):
  """transformers' generate (left padding, DynamicCache, the visual memory kept from the
  prefill) gives decode.generate's tokens."""
  model, params, folder = exports(variant)
  torch_model = load(folder)
  ids, mask, images, videos = inputs(1)
  stop = 7
  out = decode.generate(model, params, ids, mask, images, videos, max_new_tokens=8,
                        stop_ids=(stop,))
  inputs_left = torch_inputs(*left_padded(ids, mask), images, videos)
  tokens = torch_model.generate(**inputs_left, max_new_tokens=8, do_sample=False,
                                eos_token_id=stop, pad_token_id=0)[:, ids.shape[1]:].numpy()
  for row, length in enumerate(out.length):
    np.testing.assert_array_equal(tokens[row, :length], out.tokens[row, :length])
    assert (tokens[row, length:] == 0).all()
  sampled = torch_model.generate(**inputs_left, max_new_tokens=4, do_sample=True,
                                 temperature=0.8, top_k=20, top_p=0.9, min_new_tokens=4,
                                 pad_token_id=0)[:, ids.shape[1]:]
  assert sampled.shape == (2, 4) and (sampled < model.llm.vocab_size).all()


def plain_logits(folder, dtype, ids, mask):
  """Logits of the export's language part alone, as a Qwen2ForCausalLM / LlamaForCausalLM."""
  import torch
  import transformers
  text = json.loads((folder / 'config.json').read_text())['text_config']
  config_class, model_class = {
      'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[text['model_type']]
  llm = model_class.from_pretrained(folder, config=config_class(**text), dtype=dtype)
  with torch.no_grad():
    return llm(input_ids=torch.tensor(ids),
               attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()


def test_bf16_export_and_plain_qwen2(exports):
  """bf16 logits close to JAX's (float32); with zero conditioners the language part alone, as a
  Qwen2ForCausalLM, gives LaVi's logits (float32: equal, bf16: as close)."""
  import torch
  model, params, folder = exports('attention', 'bfloat16', zero_conditioners)
  _, _, f32 = exports('attention', None, zero_conditioners)
  ids, mask, images, videos = inputs()
  ours = jax_logits(model, params, ids, mask, images, videos)[mask]
  tolerance = 0.05 * np.abs(ours).max()  # bf16 weights and activations
  lavi = load(folder)
  assert lavi.model.embed_tokens.weight.dtype == torch.bfloat16
  assert np.abs(torch_logits(lavi, ids, mask, images, videos)[mask] - ours).max() < tolerance
  for path, dtype, atol in ((folder, torch.bfloat16, tolerance), (f32, torch.float32, 1e-4)):
    np.testing.assert_allclose(plain_logits(path, dtype, ids, mask)[mask], ours, rtol=0,
                               atol=atol)


def test_llama_language_part_is_plain_llama(exports):
  """LLaMA (no QKV biases, untied lm_head), zero conditioners: a LlamaForCausalLM."""
  import torch
  model, params, folder = exports('llama', None, zero_conditioners)
  ids, mask, images, videos = inputs()
  ours = jax_logits(model, params, ids, mask, images, videos)[mask]
  np.testing.assert_allclose(plain_logits(folder, torch.float32, ids, mask)[mask], ours, rtol=0,
                             atol=1e-4)


def test_concat_export_is_llava(exports):
  import torch
  import transformers
  model, params, folder = exports('concat', params=no_frame_index)
  llava = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
  ids, mask, images, _ = inputs()
  ids[0, 5], ids[1, 0] = 9, 9  # one image per row, one crop each; no video
  images = dict(pixel_values=images['pixel_values'][:, :1])
  ours = jax_logits(model, params, ids, mask, images)
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


def test_mismatched_config_is_refused(exports, tmp_path):
  folder = shutil.copytree(exports('mlp')[2], tmp_path / 'torch')
  config = json.loads((folder / 'config.json').read_text())
  config['lavi_config']['viln']['mlp_dim'] = 64
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(RuntimeError, match='ignore_mismatched_sizes'):
    load(folder)
