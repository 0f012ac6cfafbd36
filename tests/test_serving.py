"""Generation on a mesh (8 CPU devices): sharded float32 equals the one-device path; a
checkpoint restores in bfloat16 straight onto the mesh and answers as one device in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.convert import from_hf
from lavi_jax.data import synthetic
from lavi_jax.inference import Generator, Request, SamplingParams, decode
from lavi_jax.inference import generate as cli
from lavi_jax.inference.serving import Placement
from tests.data_files import write_photos
from tests.helpers import random_images, random_params, tiny_config

N = 4  # new tokens
MESH = '2,2,2'  # every axis split: rows over data x fsdp, heads and MLP over tensor


def _prompts(model, lengths):
  """Right-padded ids (B, T) with an image placeholder at 1, and B images of 2 crops."""
  ids = np.array(jax.random.randint(jax.random.key(1), (len(lengths), max(lengths)), 3,
                                    model.llm.vocab_size))
  ids[:, 1] = model.image_token_id
  mask = np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]
  return np.where(mask, ids, 0), mask, random_images(model, len(lengths), 2, 2)


@pytest.mark.parametrize('overrides', [
    {'viln.conditioner': 'attention', 'viln.kv_groups': 2, 'scan_layers': True},
    {'fusion': 'concat'},
], ids=['attention-scanned', 'concat'])
def test_sharded_float32_equals_one_device(overrides):
  model = tiny_config(**{'vision.image_size': 32}, **overrides).model
  params = random_params(model)
  ids, mask, images = _prompts(model, [9, 6, 7, 3])
  alone = decode.generate(model, params, ids, mask, images=images, max_new_tokens=N,
                          keep_logits=True)
  placement = Placement.from_flags(MESH)
  served = placement.model(model)
  sharded = decode.generate(served, placement.place(served, params), ids, mask, images=images,
                            max_new_tokens=N, keep_logits=True, placement=placement)
  np.testing.assert_array_equal(sharded.tokens, alone.tokens)
  np.testing.assert_allclose(sharded.logits, alone.logits, atol=1e-5, rtol=0)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A tiny random LaVi saved as a convert.from_hf output with the synthetic tokenizer."""
  folder = tmp_path_factory.mktemp('converted')
  config = tiny_config(**{'vision.image_size': 32, 'llm.vocab_size': 96})  # every id decodes
  from_hf.save_converted(folder, config.model, jax.tree.map(jnp.copy, random_params(config.model)))
  synthetic.synthetic_tokenizer().save(folder / 'tokenizer.json')
  return folder


def test_sharded_bfloat16_restores_onto_the_mesh_and_equals_one_device(converted, tmp_path):
  kwargs = dict(max_len=48, batch_size=3, sampling=SamplingParams(max_new_tokens=N))
  sharded = Generator.load(str(converted), mesh=MESH, dtype='bfloat16', **kwargs)
  assert sharded.model.dtype == sharded.model.param_dtype == 'bfloat16'
  leaves = jax.tree.leaves(sharded.params)
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert all(len(x.sharding.device_set) == 8 for x in leaves)
  embed = sharded.params['llm']['embed_tokens']['embedding']  # (vocab, embed)
  assert embed.addressable_shards[0].data.shape == (96 // 2, 128 // 2)  # tensor x fsdp
  one = Generator.load(str(converted), dtype='bfloat16', **kwargs)
  photo = str(write_photos(tmp_path / 'photos')['astronaut.png'])
  requests = [Request('What colour is the circle?', images=(photo,)),
              Request('What is this?', images=(photo,)), Request('Hello')]  # 4 rows on the mesh
  assert ([r.token_ids for r in sharded.generate(requests)] ==
          [r.token_ids for r in one.generate(requests)])


@pytest.mark.parametrize('mesh, message', [
    ('1,1,4', 'a tensor axis of 4 devices must divide llm.num_kv_heads=2'),  # 2 KV heads
    ('3,-1,1', '8 devices are not divisible by the fixed mesh sizes'),
    ('2,4', "mesh '2,4': give three sizes DATA,FSDP,TENSOR"),
])
def test_generate_command_names_a_mesh_that_does_not_fit(converted, mesh, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['--checkpoint', str(converted), '--prompt', 'Hi', '--mesh', mesh])
  assert e.value.code == 2 and message in capsys.readouterr().err
