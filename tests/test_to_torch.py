"""`convert.to_torch`: the export's layout, sharding and errors, and the round trip back to JAX."""

import json

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from lavi_jax.convert import from_hf, hf, to_torch
from lavi_jax.data import synthetic
from lavi_jax.models import init_params
from lavi_jax.train import checkpoint as ckpt_lib
from tests.helpers import EXPORT_VARIANTS as VARIANTS
from tests.helpers import random_params, tiny_config


def converted(tmp_path, variant='attention', tokenizer=True, seed=0, variants=VARIANTS):
  """A convert.from_hf-style folder of random parameters: (folder, model config, params)."""
  model = tiny_config(**variants[variant]).model
  params = random_params(model, seed)
  folder = tmp_path / f'jax_{variant}'
  from_hf.save_converted(folder, model, jax.tree.map(np.asarray, params))
  if tokenizer:
    synthetic.synthetic_tokenizer().save(folder / 'tokenizer.json')
  return folder, model, params


def assert_same(a, b):
  flat_a, flat_b = (traverse_util.flatten_dict(x, sep='/') for x in (a, b))
  assert set(flat_a) == set(flat_b)
  for path, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(value), err_msg=path)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_tables_cover_every_parameter(variant):
  model = tiny_config(**VARIANTS[variant]).model
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  flat = traverse_util.flatten_dict(abstract)
  entries = hf.export_tensor_map(model)
  assert len({e.hf_name for e in entries}) == len(entries)
  covered = {}
  for e in entries:
    shape = flat[e.path].shape
    assert (shape if e.index is None else shape[1:]) == e.shape, e.hf_name
    covered.setdefault(e.path, set()).add(e.index)
  assert set(covered) == set(flat)
  for path, indices in covered.items():
    assert indices == ({None} if None in indices else set(range(flat[path].shape[0])))


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_round_trip_is_bitwise(tmp_path, variant):
  folder, model, params = converted(tmp_path, variant)
  out = tmp_path / 'torch'
  to_torch.main(['--checkpoint', str(folder), '--out', str(out)])
  config = json.loads((out / 'config.json').read_text())
  assert config['model_type'] == ('llava' if variant == 'concat' else 'lavi')
  assert config['text_config']['model_type'] == model.llm.arch
  assert config['vision_config']['model_type'] == 'siglip_vision_model'
  assert {'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= {
      f.name for f in out.iterdir()}
  generation = json.loads((out / 'generation_config.json').read_text())
  tokenizer = synthetic.synthetic_tokenizer()
  assert tokenizer.token_id('<|im_end|>') in generation['eos_token_id']

  back, imported = hf.load_hf_lavi(out)
  model.llm.head_dim = back.llm.head_dim  # resolved from 0 (hidden_size / num_heads)
  assert back.to_dict() == model.to_dict()
  assert_same(params, imported)
  # And through the command line, into an Orbax folder.
  from_hf.main(['--lavi', str(out), '--out', str(tmp_path / 'back')])
  assert_same(params, from_hf.load_converted(tmp_path / 'back')[1])


def test_sharded_bf16_export(tmp_path, monkeypatch, caplog):
  from safetensors import safe_open
  folder, model, params = converted(tmp_path, tokenizer=False)
  reads = []
  read = to_torch.Source.read
  monkeypatch.setattr(to_torch.Source, 'read', lambda self, paths: reads.append(paths) or read(
      self, paths))
  monkeypatch.setattr(to_torch, 'READ_BYTES', 100_000)
  out = tmp_path / 'torch'
  index = to_torch.export(str(folder), str(out), 'bfloat16', '300KB')
  files = sorted(f.name for f in out.glob('*.safetensors'))
  n = len(files)
  assert n > 2 and files == [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)]
  stored = json.loads((out / 'model.safetensors.index.json').read_text())
  assert stored == index
  assert not (out / 'generation_config.json').exists()  # no tokenizer in the folder
  assert 'no generation_config.json; pass one with --tokenizer' in caplog.text
  total = 0
  for file in files:
    with safe_open(out / file, 'np') as f:
      names = set(f.keys())
      assert names == {k for k, v in stored['weight_map'].items() if v == file}
      assert (out / file).stat().st_size <= 300_000 + 50_000  # header and one large tensor
      for name in names:
        x = f.get_tensor(name)
        assert x.dtype == ml_dtypes.bfloat16
        total += x.nbytes
  assert total == stored['metadata']['total_size']
  assert len(stored['weight_map']) == len(hf.export_tensor_map(model))
  assert len(reads) > n and max(map(len, reads)) > 1  # groups of parameters, each read once
  assert sum(map(len, reads)) <= len(traverse_util.flatten_dict(params)) + n
  _, imported = hf.load_hf_lavi(out, dtype='float32')
  expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                          params)
  assert_same(expected, imported)


def test_mismatched_checkpoint_is_refused(tmp_path):
  folder, model, _ = converted(tmp_path, tokenizer=False)
  (folder / ckpt_lib.MANIFEST.format(0)).unlink()  # the config is edited by hand below
  stored = json.loads((folder / 'model_config.json').read_text())
  stored['llm']['intermediate_size'] = 100
  (folder / 'model_config.json').write_text(json.dumps(stored))
  with pytest.raises(hf.ConversionError, match=r'llm/layers/layer_0/mlp/up_proj/kernel is '
                     r'\(4, 128, 384\), the config gives \(4, 128, 100\)'):
    to_torch.export(str(folder), str(tmp_path / 'out'))
  stored['llm']['intermediate_size'] = 384
  stored['viln']['conditioner'] = 'film'
  (folder / 'model_config.json').write_text(json.dumps(stored))
  with pytest.raises(hf.ConversionError, match="model.viln.conditioner: 'film' is not one of"):
    to_torch.export(str(folder), str(tmp_path / 'out'))
  stored['viln']['conditioner'] = 'attention'
  stored['llm']['qkv_bias'] = False
  (folder / 'model_config.json').write_text(json.dumps(stored))
  with pytest.raises(hf.ConversionError,
                     match='unexpected llm/layers/layer_0/self_attn/k_proj/bias'):
    to_torch.export(str(folder), str(tmp_path / 'out'))
  folder, _, _ = converted(tmp_path, 'no-bias', tokenizer=False,  # one Qwen2 cannot express
                           variants={'no-bias': {'llm.qkv_bias': False}})
  with pytest.raises(hf.ConversionError, match='model.llm.qkv_bias=False with arch=.qwen2.'):
    to_torch.export(str(folder), str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='neither'):
    to_torch.export(str(tmp_path), str(tmp_path / 'out'))


def test_unknown_export_is_refused(tmp_path):
  folder, _, _ = converted(tmp_path, tokenizer=False)
  out = tmp_path / 'torch'
  to_torch.export(str(folder), str(out))
  config = json.loads((out / 'config.json').read_text())
  (out / 'config.json').write_text(json.dumps({**config, 'model_type': 'lavi2'}))
  with pytest.raises(hf.ConversionError, match="model_type='lavi2'"):
    hf.load_hf_lavi(out)
  config['text_config']['hidden_size'] = 64
  (out / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.ConversionError, match=r'model.embed_tokens.weight \(expected '
                     r'\(512, 64\), got \(512, 128\)\)'):
    hf.load_hf_lavi(out)


def test_parse_size():
  assert to_torch.parse_size('5GB') == 5 * 10 ** 9
  assert to_torch.parse_size('2GiB') == 2 * 2 ** 30
  assert to_torch.parse_size('300 kb') == 300_000
  with pytest.raises(ValueError, match='12XB'):
    to_torch.parse_size('12XB')


def test_training_workdir(tmp_path):
  """The latest checkpoint's parameters (not the optimizer state), the run's tokenizer."""
  import jax.numpy as jnp
  from lavi_jax.data import pipeline
  from lavi_jax.train import checkpoint as ckpt_lib
  from lavi_jax.train.state import TrainState
  config = tiny_config(**VARIANTS['mlp'])
  config.checkpoint.async_save = False
  params = random_params(config.model)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'run'), config)
  for step in (1, 2):
    state = TrainState(step=jnp.int32(step), params=jax.tree.map(lambda x: x * step, params),
                       opt_state={'mu': params})
    checkpointer.save(step, state, iter(pipeline.make_dataset(config)), force=True)
  checkpointer.close()
  to_torch.export(str(tmp_path / 'run'), str(tmp_path / 'torch'))
  assert_same(jax.tree.map(lambda x: x * 2, params), hf.load_hf_lavi(tmp_path / 'torch')[1])
  to_torch.main(['--checkpoint', str(tmp_path / 'run'), '--out', str(tmp_path / 'step1'),
                 '--step', '1'])
  assert_same(params, hf.load_hf_lavi(tmp_path / 'step1')[1])
  tokenizer = synthetic.synthetic_tokenizer()
  saved = json.loads((tmp_path / 'torch' / 'tokenizer.json').read_text())
  assert saved['model']['vocab'] == json.loads(tokenizer.tokenizer.to_str())['model']['vocab']
  generation = json.loads((tmp_path / 'torch' / 'generation_config.json').read_text())
  assert generation['pad_token_id'] == tokenizer.pad_id == 0


def test_sentencepiece_tokenizer_is_copied(tmp_path):
  """Given by --tokenizer (not in the checkpoint folder)."""
  from tests.data_files import train_sentencepiece
  folder, _, _ = converted(tmp_path, tokenizer=False)
  (tmp_path / 'sp').mkdir()
  model_file = train_sentencepiece(tmp_path / 'sp' / 'tokenizer.model')
  out = tmp_path / 'torch'
  to_torch.main(['--checkpoint', str(folder), '--out', str(out), '--tokenizer', str(model_file)])
  assert (out / 'tokenizer.model').read_bytes() == model_file.read_bytes()
  settings = json.loads((out / 'tokenizer_config.json').read_text())
  assert settings['eos_token'] == '</s>' and settings['tokenizer_class'] == 'LlamaTokenizer'
  generation = json.loads((out / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == [2]  # SentencePiece's </s>; the tokenizer has no <|im_end|>
