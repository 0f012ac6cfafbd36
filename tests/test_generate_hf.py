"""Greedy decoding from imported Hugging Face weights gives the token ids of `generate`."""

import jax
import numpy as np

import hf_models
from lavi_jax.convert import hf
from lavi_jax.inference import decode
from test_hf_llava import expand, llava_config

N = 8  # new tokens
P = hf_models.IMAGE_TOKEN


def _prompts(lengths, seed=0, placeholder_at=None):
  """Right-padded ids (B, T) and mask, ids avoiding the placeholders."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(P + 2, hf_models.VOCAB, (len(lengths), max(lengths)))
  if placeholder_at is not None:
    ids[:, placeholder_at] = P
  mask = np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]
  return np.where(mask, ids, 0), mask


def _hf_greedy(torch_model, ids, **kw):
  import torch
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(ids[None]), max_new_tokens=N,
                               min_new_tokens=N, do_sample=False, **kw)
  return out[0, len(ids):].numpy()


def test_qwen2_greedy_matches_transformers(tmp_path):
  import transformers
  torch_model = hf_models.randomize(transformers.Qwen2ForCausalLM(hf_models.text_config()))
  model, llm = hf.load_hf_llm(hf_models.save(torch_model, tmp_path / 'hf'),
                              hf_models.base_model())
  params = hf.init_with_imported(model, {'llm': llm}, jax.random.key(0))
  lengths = [9, 5]
  ids, mask = _prompts(lengths)
  out = decode.generate(model, params, ids, mask, max_new_tokens=N)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(out.tokens[b], _hf_greedy(torch_model, ids[b, :n]))


def test_llava_concat_greedy_matches_transformers(tmp_path):
  import torch
  import transformers
  torch_model = hf_models.randomize(
      transformers.LlavaForConditionalGeneration(llava_config(-2)))
  model, imported = hf.load_hf_llava(hf_models.save(torch_model, tmp_path / 'hf'),
                                     hf_models.base_model())
  params = hf.init_with_imported(model, imported, jax.random.key(0))
  lengths = [7, 4]
  ids, mask = _prompts(lengths, seed=1, placeholder_at=2)
  pixels = np.random.default_rng(2).uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  out = decode.generate(model, params, ids, mask, images={'pixel_values': pixels},
                        max_new_tokens=N)
  hf_ids, hf_mask, _ = expand(ids, mask)  # each placeholder -> one token per image patch
  for b in range(2):
    row = hf_ids[b, :hf_mask[b].sum()]
    reference = _hf_greedy(torch_model, row, attention_mask=torch.ones(1, len(row), dtype=int),
                           pixel_values=torch.tensor(pixels[b:b + 1, 0].transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(out.tokens[b], reference)
