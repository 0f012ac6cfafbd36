"""A `convert.to_torch` export as a Hugging Face model in its own right (convert/hf_lavi): in a
process that cannot import JAX or lavi_jax, AutoProcessor + AutoModelForCausalLM
(trust_remote_code) answer an image and a video question with the JAX Generator's greedy tokens
and logits; the processor's pixels and frames equal the data pipeline's; the chat template
renders conversations as lavi_jax.data.chat does."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lavi_jax.convert import from_hf, to_torch
from lavi_jax.data import chat, image, synthetic, video
from lavi_jax.inference import Generator, Request, SamplingParams
from lavi_jax.inference.requests import prepare
from lavi_jax.models import LaVi
from tests.data_files import write_photos, write_video
from tests.helpers import EXPORT_VARIANTS, random_params, tiny_config

QUESTIONS = {'image': 'What colour is the circle?', 'video': 'Which way does it move, left or right?'}
MAX_NEW_TOKENS = 8

# Run in a fresh interpreter: importing jax, flax or lavi_jax fails there, and the export is read
# with transformers alone. argv: export folder, image path, video path, output .npz.
SCRIPT = r'''
import importlib.abc
import sys

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'lavi_jax'):
      raise ImportError(f'{name} cannot be imported here')

sys.meta_path.insert(0, Blocked())
for name in ('jax', 'lavi_jax'):
  try:
    __import__(name)
  except ImportError:
    pass
  else:
    raise SystemExit(f'{name} was imported')

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

folder, image_path, video_path, out = sys.argv[1:]
questions = %(questions)r
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
prompts = {kind: processor.apply_chat_template(
    [{'role': 'user', 'content': [{'type': kind}, {'type': 'text', 'text': question}]}],
    add_generation_prompt=True) for kind, question in questions.items()}
results = {}
for kind, media in (('image', dict(images=[image_path])), ('video', dict(videos=[video_path]))):
  inputs = processor(text=prompts[kind], **media)
  with torch.no_grad():
    results[f'{kind}_logits'] = model(**inputs).logits[0].numpy()
  for key, value in inputs.items():
    results[f'{kind}_{key}'] = value[0].numpy()
batch = processor(text=[prompts['image'], prompts['video']], images=[[image_path], []],
                  videos=[[], [video_path]])
tokens = model.generate(**batch, max_new_tokens=%(max_new_tokens)d, do_sample=False)
results['generated'] = tokens[:, batch['input_ids'].shape[1]:].numpy()
results['batch_mask'] = batch['attention_mask'].numpy()
np.savez(out, **results)
'''


@pytest.fixture(scope='module')
def export(tmp_path_factory):
  """{'jax': convert.from_hf folder, 'hf': its export, 'model', 'params', 'image', 'video'}."""
  root = tmp_path_factory.mktemp('hf_export')
  model = tiny_config(**EXPORT_VARIANTS['attention']).model
  params = random_params(model, 0, scale=0.1)
  from_hf.save_converted(root / 'jax', model, jax.tree.map(np.asarray, params))
  synthetic.synthetic_tokenizer().save(root / 'jax' / 'tokenizer.json')
  to_torch.export(str(root / 'jax'), str(root / 'hf'))
  photos = write_photos(root / 'photos')
  return dict(jax=root / 'jax', hf=root / 'hf', model=model, params=params,
              image=photos['coffee.jpg'], video=write_video(root / 'video.mp4', side=40),
              photos=photos)


def test_transformers_alone_answers_as_the_generator(export, tmp_path):
  out = tmp_path / 'hf.npz'
  env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / 'modules'), PYTHONPATH='')
  script = SCRIPT % dict(questions=QUESTIONS, max_new_tokens=MAX_NEW_TOKENS)
  run = subprocess.run([sys.executable, '-c', script, str(export['hf']), str(export['image']),
                        str(export['video']), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  hf = dict(np.load(out))

  generator = Generator.load(str(export['jax']), max_len=256,
                             sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
  requests = {'image': Request(QUESTIONS['image'], images=(str(export['image']),)),
              'video': Request(QUESTIONS['video'], video=str(export['video']))}
  model, params = export['model'], export['params']
  apply = jax.jit(LaVi(model).apply)
  for kind, request in requests.items():
    prepared = prepare(request, generator.tokenizer, generator.template, generator.spec, model,
                       generator.max_len)
    np.testing.assert_array_equal(hf[f'{kind}_input_ids'], prepared.input_ids)
    visual = prepared.visual[f'{kind}s']
    valid = visual['frame_mask']
    prefix = 'pixel_values' if kind == 'image' else 'pixel_values_videos'
    assert hf[f'{kind}_{kind}_frame_mask'].sum() == valid.sum()
    np.testing.assert_array_equal(hf[f'{kind}_{kind}_frame_item'][:valid.sum()],
                                  visual['frame_item'][valid])
    pixels = hf[f'{kind}_{prefix}'][:valid.sum()].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.round((pixels * 0.5 + 0.5) * 255),
                                  visual['pixel_values'][valid])
    logits = apply({'params': params}, prepared.input_ids[None],
                   np.ones((1, len(prepared.input_ids)), bool),
                   **{f'{kind}s': jax.tree.map(lambda x: x[None], visual)})
    np.testing.assert_allclose(hf[f'{kind}_logits'], np.asarray(logits)[0], rtol=0, atol=1e-4)

  results = generator.generate(list(requests.values()))
  assert hf['batch_mask'].sum(1).tolist() != [hf['batch_mask'].shape[1]] * 2  # left padded
  for row, result in enumerate(results):
    assert result.finish_reason in ('stop', 'length'), result.error
    ids = hf['generated'][row]
    np.testing.assert_array_equal(ids[:len(result.token_ids)], result.token_ids)
    assert (ids[len(result.token_ids):] == generator.tokenizer.pad_id).all()


@pytest.mark.parametrize('max_crops', [1, 5, 10])
def test_processor_images_equal_the_pipeline(export, max_crops):
  """Every photo mode (grey, palette, RGBA, 16-bit, JPEG), with AnyRes grids and without."""
  from lavi_jax.convert.hf_lavi.processing_lavi import LaViImageProcessor
  processor = LaViImageProcessor.from_pretrained(export['hf'], max_crops=max_crops)
  side, grids = processor.size, image.DEFAULT_GRIDS
  for name, path in export['photos'].items():
    for anyres in (True, False):
      ours = processor.image_crops(str(path), anyres)
      decoded = image.decode_image(str(path))
      expected = (image.anyres_crops(decoded, side, grids, max_crops) if anyres
                  else image.resize(decoded, side)[None])
      np.testing.assert_array_equal(ours, expected, err_msg=f'{name} anyres={anyres}')
  pixels = processor(images=[[str(export['image'])]])
  crops = image.anyres_crops(image.decode_image(str(export['image'])), side, grids, max_crops)
  assert pixels['pixel_values'].shape == (1, len(crops), 3, side, side)
  np.testing.assert_allclose(pixels['pixel_values'][0].transpose(0, 2, 3, 1),
                             (crops / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_frames', [3, 8, 32])
def test_processor_video_frames_equal_the_pipeline(export, num_frames):
  from lavi_jax.convert.hf_lavi.processing_lavi import LaViImageProcessor
  processor = LaViImageProcessor.from_pretrained(export['hf'], num_frames=num_frames)
  side = processor.size
  path = str(export['video'])
  np.testing.assert_array_equal(processor.video_frames(path),
                                video.video_frames(path, num_frames, side))
  frames = np.random.default_rng(0).integers(0, 256, (20, 30, 50, 3), np.uint8)
  np.testing.assert_array_equal(processor.video_frames(frames),
                                video.video_frames(frames, num_frames, side))


@pytest.mark.parametrize('name', sorted(chat.TEMPLATES))
def test_chat_template_renders_as_the_pipeline(name):
  """A multi-turn conversation with an image and a video: the same text and ids as
  chat.tokenize_prompt."""
  import transformers
  template = chat.get_template(name)
  tokenizer = synthetic.synthetic_tokenizer()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer,
                                            bos_token='<s>',
                                            chat_template=to_torch.chat_template_jinja(template))
  messages = [
      {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'what is it'}]},
      {'role': 'assistant', 'content': [{'type': 'text', 'text': 'a red circle'}]},
      {'role': 'user', 'content': [{'type': 'text', 'text': 'and here'}, {'type': 'video'}]},
  ]
  conversation = [{'from': 'human', 'value': '<image>\nwhat is it'},
                  {'from': 'gpt', 'value': 'a red circle'},
                  {'from': 'human', 'value': 'and here\n<video>'}]
  text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  expected = chat.tokenize_prompt(conversation, tokenizer, template)
  assert hf(text, add_special_tokens=False)['input_ids'] == expected.tolist()
  rendered, _, _ = chat.render(conversation + [{'from': 'gpt', 'value': 'blue'}], template)
  full = hf.apply_chat_template(messages + [{'role': 'assistant', 'content': 'blue'}],
                                tokenize=False)
  assert full == ('<s>' if template.bos else '') + rendered
  with pytest.raises(Exception, match='only user and assistant messages'):
    hf.apply_chat_template([{'role': 'system', 'content': 'x'}] + messages, tokenize=False)


def test_export_files(export):
  """The remote code and its registration; the processor settings are the Generator's."""
  folder = export['hf']
  config = json.loads((folder / 'config.json').read_text())
  assert config['auto_map'] == to_torch.AUTO_MAP
  for name in to_torch.HF_CODE_FILES:
    source = (folder / name).read_text()
    assert source == (to_torch.HF_CODE / name).read_text()
  settings = json.loads((folder / 'preprocessor_config.json').read_text())
  generator = Generator.load(str(export['jax']))
  spec = generator.spec
  assert (settings['size'], settings['max_crops'], settings['num_frames']) == (
      spec.image_size, spec.max_crops, spec.num_frames)
  assert [tuple(g) for g in settings['grids']] == list(spec.grids)
