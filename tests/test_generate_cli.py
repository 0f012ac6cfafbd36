"""`Generator` and `python -m lavi_jax.inference.generate` on tiny checkpoints: a convert.from_hf
output and a training workdir, a real photo and a video, and bad requests that fail alone."""

import json

import jax
import jax.numpy as jnp
import pytest

from lavi_jax.convert import from_hf
from lavi_jax.data import pipeline, synthetic
from lavi_jax.inference import Generator, Request, SamplingParams
from lavi_jax.inference import generate as cli
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train.state import TrainState
from tests.data_files import write_photos, write_video
from tests.helpers import random_params, tiny_config

NEW = ['--max-new-tokens', '4']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny random LaVi saved as a convert.from_hf output (with the synthetic tokenizer), a
  photo, a video and a file that is no video."""
  root = tmp_path_factory.mktemp('generate')
  config = tiny_config(**{'vision.image_size': 32, 'llm.vocab_size': 96})  # every id decodes
  params = random_params(config.model)
  from_hf.save_converted(root / 'converted', config.model, jax.tree.map(jnp.copy, params))
  synthetic.synthetic_tokenizer().save(root / 'converted' / 'tokenizer.json')
  (root / 'not_a_video.mp4').write_text('hello')
  return dict(config=config, params=params, converted=str(root / 'converted'),
              photo=str(write_photos(root / 'photos')['astronaut.png']),
              video=str(write_video(root / 'video.mp4')), not_video=str(root / 'not_a_video.mp4'),
              root=root)


def test_bad_requests_fail_alone(files):
  generator = Generator.load(files['converted'], max_len=64, batch_size=4,
                             sampling=SamplingParams(max_new_tokens=4))
  requests = [
      Request('What colour is the circle?', images=(files['photo'],), id='ok'),
      Request('What is this?', images=(str(files['root'] / 'missing.png'),), id='lost'),
      Request('Which way is it moving?', video=files['not_video']),
      Request('red ' * 80),
      Request('  '),
      Request('Which way is it moving?', video=files['video']),
      Request('<image> and <image>?', images=(files['photo'],)),
  ]
  results = generator.generate(requests)
  errors = [r.error for r in results]
  assert errors[0] is None and errors[5] is None
  assert "request 1 (id 'lost')" in errors[1] and 'missing.png does not exist' in errors[1]
  assert errors[2].startswith('request 2: ') and 'not_a_video.mp4 cannot be decoded' in errors[2]
  assert 'request 3: ' in errors[3] and 'the cache holds 64' in errors[3]
  assert 'request 4: the prompt is empty' == errors[4]
  assert 'request 6: 2 <image> placeholders but 1 images' == errors[6]
  alone = generator.generate([requests[0], requests[5]])  # without the failures
  for result, expected in zip([results[0], results[5]], alone):
    assert result.finish_reason in ('stop', 'length') and 1 <= len(result.token_ids) <= 4
    assert result.text == expected.text and result.token_ids == expected.token_ids


def test_cli_streams_the_answer_to_a_prompt(files, capsys):
  prompt = 'What colour is the circle?'
  assert cli.main(['--checkpoint', files['converted'], '--image', files['photo'], '--prompt',
                   prompt, *NEW]) == 0
  expected = Generator.load(files['converted'], sampling=SamplingParams(max_new_tokens=4)) \
      .generate([Request(prompt, images=(files['photo'],))])[0]
  assert capsys.readouterr().out == expected.text + '\n'
  assert cli.main(['--checkpoint', files['converted'], '--image', files['photo'], '--prompt',
                   ' ', *NEW]) == 1
  assert 'request 0: the prompt is empty' in capsys.readouterr().err


def test_cli_answers_a_requests_file(files, tmp_path, capsys):
  requests = tmp_path / 'requests.jsonl'
  requests.write_text('\n'.join([
      json.dumps(dict(id='photo', prompt='What colour is the circle?', images=files['photo'])),
      '{"prompt": "no closing brace"',
      json.dumps(dict(prompt='Which way is it moving?', video=files['video'], temperature=0.7,
                      top_k=5, seed=1)),
      json.dumps(dict(prompt='How many shapes?', images=['missing.png'])),
      json.dumps(dict(prompt='hi', top_p=2.0)),
  ]))
  output = tmp_path / 'results.jsonl'
  assert cli.main(['--checkpoint', files['converted'], '--requests', str(requests), '--output',
                   str(output), '--batch-size', '2', *NEW]) == 1
  results = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r['id'] for r in results] == ['photo', f'{requests}:2', f'{requests}:3',
                                        f'{requests}:4', f'{requests}:5']
  assert 'text' in results[0] and 'text' in results[2]
  assert results[1]['error'].startswith(f'{requests}:2: ')
  assert 'missing.png does not exist' in results[3]['error']
  assert 'top_p must be in (0, 1]' in results[4]['error']
  assert '3 of 5 requests failed' in capsys.readouterr().err


def test_cli_loads_a_training_workdir(files, tmp_path, capsys):
  config = files['config']
  config.checkpoint.async_save = False
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), config)
  state = TrainState(step=jnp.int32(3), params=files['params'], opt_state={'count': jnp.int32(3)})
  checkpointer.save(3, state, iter(pipeline.make_dataset(config)), force=True)
  checkpointer.close()
  prompt = 'How many shapes are there?'
  assert cli.main(['--checkpoint', str(tmp_path), '--prompt', prompt, *NEW]) == 0
  expected = Generator.load(files['converted'], sampling=SamplingParams(max_new_tokens=4)) \
      .generate([prompt])[0]
  assert capsys.readouterr().out == expected.text + '\n'
