"""Broken or unsupported checkpoints fail with a message naming what is wrong."""

import json
import re

import numpy as np
import pytest

from lavi_jax.convert import hf
from tests import hf_models


@pytest.fixture(scope='module')
def qwen2(tmp_path_factory):
  """(config dict, tensors) of a tiny Qwen2ForCausalLM."""
  import transformers
  from safetensors.numpy import load_file
  path = hf_models.save(transformers.Qwen2ForCausalLM(hf_models.text_config()),
                        tmp_path_factory.mktemp('qwen2'))
  return json.loads((path / 'config.json').read_text()), load_file(path / 'model.safetensors')


def write(path, config, tensors):
  from safetensors.numpy import save_file
  path.mkdir()
  (path / 'config.json').write_text(json.dumps(config))
  save_file(tensors, path / 'model.safetensors')
  return path


def fails(path, *needles, load=hf.load_hf_llm):
  with pytest.raises(hf.ConversionError) as error:
    load(path)
  for needle in needles:
    assert needle in str(error.value)


def test_missing_tensor(tmp_path, qwen2):
  config, tensors = qwen2
  name = 'model.layers.1.mlp.up_proj.weight'
  fails(write(tmp_path / 'ckpt', config, {k: v for k, v in tensors.items() if k != name}),
        'missing', name)


def test_wrong_shape(tmp_path, qwen2):
  config, tensors = qwen2
  name = 'model.layers.0.self_attn.k_proj.weight'  # (2 kv heads * 8, 32)
  fails(write(tmp_path / 'ckpt', config, {**tensors, name: np.zeros((8, 32), np.float32)}),
        name, 'expected (16, 32)', 'got (8, 32)')


def test_unexpected_tensor(tmp_path, qwen2):
  config, tensors = qwen2
  name = 'model.layers.0.self_attn.o_proj.bias'
  fails(write(tmp_path / 'ckpt', config, {**tensors, name: np.zeros(32, np.float32)}),
        'unexpected', name)


@pytest.mark.parametrize('change, needles', [
    (dict(model_type='mistral'), ('architecture', "'mistral'")),
    (dict(rope_parameters=dict(rope_type='linear', factor=2.0, rope_theta=1e4)), ("'linear'",)),
    (dict(rope_scaling=dict(type='dynamic', factor=2.0)), ("'dynamic'",)),
    (dict(model_type='llama', mlp_bias=True), ('mlp_bias',)),
    (dict(model_type='llama', attention_bias=True), ('attention_bias',)),
    (dict(use_sliding_window=True), ('sliding',)),
])
def test_unsupported_llm_config(tmp_path, qwen2, change, needles):
  config, tensors = qwen2
  config = {k: v for k, v in config.items() if k != 'rope_parameters'}
  fails(write(tmp_path / 'ckpt', {**config, **change}, tensors), 'unsupported', *needles)


@pytest.mark.parametrize('change, needles', [
    (dict(vision_feature_select_strategy='default'), ("'default'", 'SigLIP')),
    (dict(vision_config=dict(model_type='clip_vision_model')), ("'clip_vision_model'",)),
    (dict(model_type='llava_next'), ("'llava_next'",)),
])
def test_unsupported_llava_config(tmp_path, change, needles):
  config = dict(model_type='llava', vision_feature_select_strategy='full',
                vision_config=dict(model_type='siglip_vision_model'),
                text_config=dict(model_type='qwen2'))
  fails(write(tmp_path / 'ckpt', {**config, **change}, {}), 'unsupported', *needles,
        load=hf.load_hf_llava)


def test_merge_names_bad_parameters():
  base = {'llm': {'norm': {'scale': np.ones(4, np.float32)}}}
  with pytest.raises(hf.ConversionError, match=re.escape('llm/norm/scale (LaVi (4,), '
                                                         'imported (5,))')):
    hf.merge_params(base, {'llm': {'norm': {'scale': np.ones(5)}}})
  with pytest.raises(hf.ConversionError, match='llm/norm/bias'):
    hf.merge_params(base, {'llm': {'norm': {'bias': np.ones(4)}}})
  merged = hf.merge_params(base, {'llm': {'norm': {'scale': np.full(4, 2, np.float64)}}})
  assert merged['llm']['norm']['scale'].dtype == np.float32


def test_mapping_round_trips():
  """to_hf inverts to_flax for every kind of entry of every table."""
  model = hf_models.base_model()
  model.llm.update(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2)
  rng = np.random.default_rng(0)
  entries = (hf.llm_tensor_map(model) + hf.vision_tensor_map(model) +
             hf.projector_tensor_map(model))
  for kind in ('copy', 'linear', 'conv'):
    entry = next(e for e in entries if e.kind == kind)
    x = rng.normal(size=entry.hf_shape)
    y = hf.to_flax(kind, x, entry.shape)
    assert y.shape == entry.shape
    np.testing.assert_array_equal(hf.to_hf(kind, y, entry.hf_shape), x)


def test_url_checkpoint_is_refused():
  """safetensors are memory-mapped: a gs:// folder is refused, naming it."""
  with pytest.raises(hf.ConversionError, match='gs://bucket/llm: safetensors checkpoints are '
                     'read from a local folder'):
    hf.Checkpoint('gs://bucket/llm')
