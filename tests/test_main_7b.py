"""The main job's preflight (lavi_jax/preflight.py): a 7B run without its checkpoint, data and
tokenizer says what it needs; bad config values reach the user as one message naming the key;
everything stops before a model is built."""

import subprocess
import sys

import pytest
import tokenizers

from lavi_jax import config as lavi_config
from lavi_jax import preflight
from lavi_jax.convert import hf
from lavi_jax.train import checkpoint as ckpt_lib
from tests.data_files import conversation, write_annotations

# config.json of Qwen/Qwen2-7B-Instruct and the vision part of google/siglip-so400m-patch14-384.
QWEN2_7B_INSTRUCT = dict(
    architectures=['Qwen2ForCausalLM'], hidden_act='silu', hidden_size=3584,
    intermediate_size=18944, max_position_embeddings=32768, max_window_layers=28,
    model_type='qwen2', num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
    rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, tie_word_embeddings=False,
    torch_dtype='bfloat16', use_sliding_window=False, vocab_size=152064)
SIGLIP_SO400M_384 = dict(hidden_size=1152, image_size=384, intermediate_size=4304,
                         model_type='siglip_vision_model', num_attention_heads=16,
                         num_hidden_layers=27, patch_size=14)


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'lavi_jax.main', *args], capture_output=True,
                        text=True, timeout=300)


def test_bare_7b_run_says_what_it_needs(tmp_path):
  result = _main('--config=configs/7b.py', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  for key in ('config.init_from:', 'config.data.train_mixture:', 'config.data.tokenizer:'):
    assert key in result.stderr
  assert ('python -m lavi_jax.convert.from_hf --llm /models/Qwen2-7B-Instruct --vision '
          '/models/siglip-so400m-patch14-384 --config configs/7b.py --out /models/lavi_7b_init'
          in result.stderr)
  assert 'hf download Qwen/Qwen2-7B-Instruct' in result.stderr
  assert f'--workdir={tmp_path / "run"}' in result.stderr
  assert not (tmp_path / 'run').exists()  # stopped before the trainer


def test_bad_key_value_exits_1_naming_the_key(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 '--config.model.fusion=bogus')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert "config.model.fusion: 'bogus' is not one of" in result.stderr


def test_missing_files_are_listed_together(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 f'--config.init_from={tmp_path / "nothing"}',
                 f'--config.data.tokenizer={tmp_path / "tokenizer.json"}',
                 f'--config.data.train_mixture=llava:{tmp_path / "a.json"}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  lines = result.stderr.splitlines()
  assert lines[0] == 'configs/tiny.py cannot train yet:'
  assert [line.split(':')[0].strip() for line in lines[1:]] == [
      'config.data.train_mixture', 'config.data.tokenizer', 'config.init_from']


def test_7b_dry_run_prints_its_table():
  result = _main('--config=configs/7b.py', '--config.dry_run=True')
  assert result.returncode == 0, result.stderr
  assert 'total' in result.stdout and 'conditioners' in result.stdout


def _converted_7b_model():
  """The model config that convert.from_hf writes for Qwen2-7B-Instruct + SigLIP-so400m."""
  model = lavi_config.load_config_file('configs/7b.py').model
  model.llm.update(hf.llm_section(QWEN2_7B_INSTRUCT))
  model.vision.update(hf.vision_section(SIGLIP_SO400M_384))
  return model


def test_7b_matches_the_converted_qwen2_and_siglip():
  config = lavi_config.load_config_file('configs/7b.py')
  assert ckpt_lib.model_config_differences(_converted_7b_model(), config.model) == []


def _qwen2_layout_tokenizer(path):
  """A tokenizer.json with Qwen2's ids: 151643 words, then <|endoftext|>, <|im_start|>,
  <|im_end|> (<image> and <video> are appended as 151646 and 151647 when loaded)."""
  vocab = {f'w{i}': i for i in range(151643)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='w0'))
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ('<|endoftext|>', '<|im_start|>', '<|im_end|>')])
  tokenizer.save(str(path))
  return path


def test_7b_with_everything_set_passes_the_preflight(tmp_path):
  converted = tmp_path / 'converted'
  converted.mkdir()
  (converted / 'model_config.json').write_text(_converted_7b_model().to_json())
  data = write_annotations(tmp_path / 'si.json', [
      dict(id='0', image='a.jpg', conversations=conversation('<image>\nWhat?', 'A cat.'))])
  config = lavi_config.load_config_file('configs/7b.py')
  config.init_from = str(converted)
  config.data.update(train_mixture=f'llava:{data}@1',
                     tokenizer=str(_qwen2_layout_tokenizer(tmp_path / 'tokenizer.json')))
  preflight.check(config, 'configs/7b.py', str(tmp_path / 'run'))
  config.model.viln.heads = 4  # a different model than the one converted
  with pytest.raises(lavi_config.ConfigError, match='config.init_from: .* model.viln.heads'):
    preflight.check(config, 'configs/7b.py', str(tmp_path / 'run'))
