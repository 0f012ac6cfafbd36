"""Qwen2 / LLaMA import: LaVi's logits (no images) equal the Hugging Face model's."""

import jax
import numpy as np
import pytest

import hf_models
from lavi_jax.convert import hf
from lavi_jax.models import LaVi

CASES = {
    # name: (HF text config kwargs, LaVi overrides, ViLN every)
    'qwen2-scan-gqa-tied-period2': (dict(arch='qwen2', layers=4, kv_heads=2, tie=True),
                                    dict(scan_layers=True), 2),
    'qwen2-unscanned-mha-untied': (dict(arch='qwen2', kv_heads=4, tie=False),
                                   dict(scan_layers=False), 1),
    'llama-scan-mqa-untied-head_dim': (dict(arch='llama', kv_heads=1, tie=False, head_dim=16),
                                       dict(scan_layers=True, remat='none'), 1),
    'llama-unscanned-gqa-tied': (dict(arch='llama', kv_heads=2, tie=True),
                                 dict(scan_layers=False), 1),
}


def random_batch(seed=0, batch=2, length=9):
  """Token ids (no placeholders) and a right-padded mask: row 1 has 3 padding positions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(hf_models.IMAGE_TOKEN + 2, hf_models.VOCAB, (batch, length))
  mask = np.ones((batch, length), bool)
  mask[1, -3:] = False
  ids[~mask] = 0
  return ids, mask


def hf_logits(model, ids, mask):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
                 ).logits.numpy()


@pytest.mark.parametrize('case', list(CASES))
def test_logits_match_hf(tmp_path, case):
  import transformers
  text_kw, overrides, every = CASES[case]
  cls = {'qwen2': transformers.Qwen2ForCausalLM, 'llama': transformers.LlamaForCausalLM}
  torch_model = hf_models.randomize(cls[text_kw['arch']](hf_models.text_config(**text_kw)))
  path = hf_models.save(torch_model, tmp_path / 'hf')
  base = hf_models.base_model(**overrides)
  base.viln.every = every
  model, llm = hf.load_hf_llm(path, base)
  assert model.llm.arch == text_kw['arch']
  assert model.llm.tie_word_embeddings == text_kw['tie']
  assert ('lm_head' in llm) != text_kw['tie']
  params = hf.init_with_imported(model, {'llm': llm}, jax.random.key(0))
  ids, mask = random_batch()
  ours = np.asarray(jax.jit(LaVi(model).apply)({'params': params}, ids, mask))
  ref = hf_logits(torch_model, ids, mask)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-4)


def test_bf16_and_sharded_checkpoints(tmp_path):
  import torch
  import transformers
  torch_model = hf_models.randomize(transformers.Qwen2ForCausalLM(hf_models.text_config()))
  _, fp32 = hf.load_hf_llm(hf_models.save(torch_model, tmp_path / 'fp32'))
  sharded = hf_models.save(torch_model, tmp_path / 'sharded', max_shard_size='20KB')
  assert (sharded / 'model.safetensors.index.json').is_file()
  assert len(list(sharded.glob('*.safetensors'))) > 1
  _, from_shards = hf.load_hf_llm(sharded)
  jax.tree.map(np.testing.assert_array_equal, from_shards, fp32)

  bf16_path = hf_models.save(torch_model.to(torch.bfloat16), tmp_path / 'bf16')
  _, bf16 = hf.load_hf_llm(bf16_path)
  assert all(x.dtype == np.dtype('bfloat16') for x in jax.tree.leaves(bf16))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(a.dtype)), bf16, fp32)
  _, upcast = hf.load_hf_llm(bf16_path, dtype='float32')
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(upcast))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float32)), upcast, bf16)
