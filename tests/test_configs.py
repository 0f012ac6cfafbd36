"""Configs build abstractly with the published shapes, and bad values are named."""

import subprocess
import sys

import pytest

from lavi_jax import config as lavi_config
from lavi_jax import dry_run
from tests.helpers import tiny_config


def _hf_count(model_cls, hf_config, skip_prefix=None):
  torch = pytest.importorskip('torch')
  with torch.device('meta'):
    module = model_cls(hf_config)
  return sum(p.numel() for name, p in module.named_parameters()
             if skip_prefix is None or not name.removeprefix('vision_model.').startswith(skip_prefix))


def _siglip_so400m():
  from transformers import SiglipVisionConfig, SiglipVisionModel
  hf = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                          num_attention_heads=16, image_size=384, patch_size=14)
  # The attention-pooling head is not part of a LLaVA/LaVi vision tower.
  return _hf_count(SiglipVisionModel, hf, skip_prefix='head.')


QWEN2 = {
    'configs/7b.py': dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          tie_word_embeddings=False),
    'configs/0_5b.py': dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                            num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                            tie_word_embeddings=True),
}


@pytest.mark.parametrize('config_file', sorted(QWEN2))
def test_parameter_counts_match_hugging_face(config_file):
  from transformers import Qwen2Config, Qwen2ForCausalLM
  config = lavi_config.load_config_file(config_file)
  lavi_config.validate(config, num_devices=8)
  counts = dry_run.count_by_group(dry_run.abstract_params(config.model))
  assert counts['llm'] == _hf_count(Qwen2ForCausalLM, Qwen2Config(**QWEN2[config_file]))
  assert counts['vision'] == _siglip_so400m()
  assert 0 < counts['conditioners'] < 0.15 * counts['llm']  # a small adapter, not a tower


def test_7b_total_is_qwen2_7b_plus_siglip_plus_conditioners():
  config = lavi_config.load_config_file('configs/7b.py')
  counts = dry_run.count_by_group(dry_run.abstract_params(config.model))
  assert round(counts['llm'] / 1e9, 2) == 7.62  # published Qwen2-7B size
  assert round(counts['vision'] / 1e9, 2) in (0.40, 0.41)  # SigLIP-so400m vision tower


def test_dry_run_command_prints_the_table():
  out = subprocess.run(
      [sys.executable, '-m', 'lavi_jax.main', '--config=configs/7b.py', '--config.dry_run=True',
       '--config.mesh.num_devices=256'], capture_output=True, text=True, check=True).stdout
  for word in ('vision', 'projector', 'conditioners', 'llm', 'total', 'per device'):
    assert word in out
  assert '(1, 256, 1)' in out


@pytest.mark.parametrize('key,value,message', [
    ('llm.num_kv_heads', 3, 'not divisible by num_kv_heads'),
    ('llm.hidden_size', 130, 'not divisible by num_heads'),
    ('viln.conditioner', 'film', "'film' is not one of"),
    ('viln.sublayers', ('attn', 'ffn'), "unknown names \\['ffn'\\]"),
    ('viln.kv_groups', 9, 'kv_groups'),
    ('viln.layers', (0, 7), 'out of range'),
    ('fusion', 'xattn', 'model.fusion'),
    ('vision.feature_layers', (5,), 'out of range'),
])
def test_validation_names_the_bad_key(key, value, message):
  config = tiny_config(**{key: value})
  with pytest.raises(lavi_config.ConfigError, match=message) as error:
    lavi_config.validate(config, num_devices=1)
  assert f'config.model.{key.split(".")[0]}' in str(error.value)


def test_global_batch_follows_the_mesh_and_names_the_key():
  config = tiny_config()  # data.batch_size=16
  assert lavi_config.global_batch_size(config, num_devices=8) == 16
  config.train.accumulation_steps = 4  # 16 rows cannot make 4 micro-batches over 8 devices
  with pytest.raises(lavi_config.ConfigError, match=r'config.data.batch_size: .* multiple of 32'):
    lavi_config.validate(config, num_devices=8)
  config.data.per_device_batch_size = 4  # 4 rows per device: 1 per micro-batch
  assert lavi_config.global_batch_size(config, num_devices=8) == 32
  config.mesh.update(data=2, fsdp=2, tensor=2, rules='fsdp_tp')  # tensor holds no batch
  assert lavi_config.global_batch_size(config, num_devices=8) == 16
  config.data.per_device_batch_size = 3
  with pytest.raises(lavi_config.ConfigError, match='config.data.per_device_batch_size'):
    lavi_config.global_batch_size(config, num_devices=8)
