"""`python -m lavi_jax.eval` end to end on a tiny random model and tiny dataset exports written
here: Parquet with embedded photos (MME, MMBench), JSONL with photo paths (POPE, TextVQA),
a JSON list with videos (MVBench) and video frames given as images (SEED-Bench); and
benchmarks during a tiny training run."""

import io
import json
import shutil

import jax
import jax.numpy as jnp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lavi_jax.convert import from_hf
from lavi_jax.data import synthetic
from lavi_jax.eval import __main__ as cli
from lavi_jax.train import loop
from lavi_jax.train.metrics import read_metrics
from tests.data_files import write_photos, write_video
from tests.helpers import random_params, tiny_config

TASKS = 'mme,pope_random,mmbench_en_dev,textvqa_val,mvbench_action_count,seedbench'


def png(path, size=None):
  image = Image.open(path).convert('RGB')
  out = io.BytesIO()
  (image.resize(size) if size else image).save(out, 'PNG')
  return out.getvalue()


def write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def write_parquet(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(records), path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  config = tiny_config(**{'vision.image_size': 32, 'llm.vocab_size': 96})
  params = random_params(config.model)
  from_hf.save_converted(root / 'model', config.model, jax.tree.map(jnp.copy, params))
  synthetic.synthetic_tokenizer().save(root / 'model' / 'tokenizer.json')
  photos = write_photos(root / 'data' / 'photos')
  data = root / 'data'
  astronaut = {'bytes': png(photos['astronaut.png']), 'path': 'astronaut.png'}
  coffee = {'bytes': png(photos['coffee.jpg']), 'path': None}
  write_parquet(data / 'mme' / 'test.parquet', [
      dict(question_id=f'{c}/{i}.png', image=img, question=f'Is there a {w}? Please answer '
           'yes or no.', answer=a, category=c)
      for c, i, img in (('existence', 0, astronaut), ('code_reasoning', 1, coffee))
      for w, a in (('person', 'Yes'), ('cat', 'No'))])
  write_jsonl(data / 'pope' / 'random.jsonl', [
      dict(question_id=str(i), image='../photos/' + name, question=f'Is there a {w} in the '
           'image?', answer=a, category='random')
      for i, (name, w, a) in enumerate([('astronaut.png', 'person', 'yes'),
                                        ('coffee.jpg', 'dog', 'no'),
                                        ('camera.png', 'camera', 'yes')])])
  options = [dict(A='a cup', B='a person', C='a dog', D='a tree'),
             dict(A='a person', B='a dog', C='a tree', D='a cup')]
  write_parquet(data / 'mmbench' / 'dev.parquet', [
      dict(index=index, question='What is in the image?', hint=hint, answer=answer,
           category='object', source='test', split='dev', image=img, **{'L2-category': 'p'},
           **opts)
      for index, hint, answer, img, opts in (
          (0, None, 'B', astronaut, options[0]), (1_000_000, 'A photo.', 'A', astronaut,
                                                  options[1]),
          (1, None, 'A', coffee, options[0]))])
  write_jsonl(data / 'textvqa' / 'validation.jsonl', [
      dict(question_id=0, question='what is written here?', image='../photos/coffee.jpg',
           answers=['coffee'] * 7 + ['cup'] * 3)])
  (data / 'mvbench' / 'video' / 'perception' / 'videos').mkdir(parents=True)
  video = write_video(data / 'mvbench' / 'video' / 'perception' / 'videos' / 'v.mp4')
  (data / 'mvbench' / 'action_count.json').write_text(json.dumps([
      dict(video=video.name, question='How many times?', candidates=['1', '2', '3'],
           answer='3')]))
  frames = [png(photos['astronaut.png'], (40, 30)), png(photos['coffee.jpg'], (40, 30))]
  write_parquet(data / 'seedbench' / 'test.parquet', [
      dict(question_id='s0', question='What happens?', choice_a='a', choice_b='b',
           choice_c='c', choice_d='d', answer='A', data_type='video', image=frames),
      dict(question_id='s1', question='What is it?', choice_a='a', choice_b='b',
           choice_c='c', choice_d='d', answer='B', data_type='image', image=[frames[0]])])
  return dict(model=str(root / 'model'), params=params, data=str(data), root=root)


def test_eval_cli_writes_results_and_samples(files, capsys):
  out = files['root'] / 'out'
  assert cli.main(['--checkpoint', files['model'], '--tasks', TASKS, '--data-dir',
                   files['data'], '--output-dir', str(out), '--max-new-tokens', '2',
                   '--batch-size', '1', '--num-frames', '2', '--max-len', '160']) == 0
  assert 'results.json' in capsys.readouterr().out
  results = json.loads((out / 'results.json').read_text())
  assert set(results) >= {'results', 'configs', 'versions', 'n-samples', 'config', 'date'}
  expected = {
      'mme': ['mme_perception_score', 'mme_cognition_score'],
      'pope_random': ['pope_accuracy', 'pope_precision', 'pope_recall', 'pope_f1_score',
                      'pope_yes_ratio'],
      'mmbench_en_dev': ['gpt_eval_score'], 'textvqa_val': ['exact_match'],
      'mvbench_action_count': ['mvbench_accuracy'],
      'seedbench': ['seed_image', 'seed_video', 'seed_all'],
  }
  assert list(results['results']) == list(expected)
  for task, metrics in expected.items():
    row = results['results'][task]
    for metric in metrics:
      assert isinstance(row[f'{metric},none'], float), (task, metric)
      assert f'{metric}_stderr,none' in row
  assert results['n-samples']['mme'] == {'original': 4, 'effective': 4}
  assert results['config']['num_frames'] == 2
  assert results['configs']['pope_random']['generation_kwargs']['max_new_tokens'] == 2
  samples = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
  assert len(samples) == 4 + 3 + 3 + 1 + 1 + 2
  for sample in samples:
    assert set(sample) >= {'task', 'doc_id', 'doc', 'target', 'arguments', 'resps',
                           'filtered_resps'}
    assert sample['resps'][0][0] == sample['filtered_resps'][0]
    assert sample['resps'][0][0] == sample['resps'][0][0].strip()
    assert set(expected[sample['task']]) & set(sample)
    if sample['task'] in ('mme', 'mmbench_en_dev', 'seedbench'):
      assert 'image' not in sample['doc']  # embedded images are not logged
  pope = [s for s in samples if s['task'] == 'pope_random'][0]
  assert pope['arguments']['gen_args_0']['arg_0'] == (
      'Is there a person in the image?\nAnswer the question using a single word or phrase.')
  assert pope['arguments']['gen_args_0']['arg_1']['max_new_tokens'] == 2
  assert pope['pope_accuracy']['ground_truth'] == 'yes' and pope['target'] == 'yes'


def test_eval_cli_names_a_bad_record(files, tmp_path, capsys):
  write_jsonl(tmp_path / 'pope' / 'random.jsonl', [
      dict(question_id='0', image=files['data'] + '/photos/astronaut.png', question='Is it?',
           answer='yes'),
      dict(question_id='1', question='No image?', answer='no')])
  assert cli.main(['--checkpoint', files['model'], '--tasks', 'pope_random', '--data-dir',
                   str(tmp_path), '--output-dir', str(tmp_path / 'out'), '--batch-size', '1',
                   '--max-new-tokens', '2', '--max-len', '160']) == 1
  error = capsys.readouterr().err
  assert f'{tmp_path}/pope/random.jsonl record 1: missing field \'image\'' in error
  # the answer before the bad record is kept
  assert [json.loads(line)['doc_id'] for line in
          (tmp_path / 'out' / 'samples.jsonl').read_text().splitlines()] == [0]
  assert cli.main(['--checkpoint', files['model'], '--tasks', 'gqa', '--data-dir',
                   str(tmp_path)]) == 1
  assert 'no gqa/testdev{.parquet,.jsonl,.json}' in capsys.readouterr().err


def test_benchmarks_during_training(files, tmp_path):
  """config.eval in a 2-step run: a missing data file stops the Trainer before it starts, a
  bad record is counted in eval/errors and training goes on, and a limit keeps MME's pairs."""
  config = tiny_config()
  config.data.update(batch_size=8, max_text_len=48)
  config.train.stages.train.update(steps=2, warmup_steps=1)
  config.checkpoint.update(async_save=False, every=2)
  assert loop._periodic_eval(config, mesh=None) is None  # off by default
  data = tmp_path / 'data'
  shutil.copytree(files['data'], data)
  config.eval.update(tasks='mme,gqa', every=2, data_dir=str(data), limit=3, batch_size=4,
                     max_len=160, max_new_tokens=2)
  with pytest.raises(FileNotFoundError, match='task gqa: no gqa/testdev'):
    loop.Trainer(config, str(tmp_path / 'run'))
  write_jsonl(data / 'pope' / 'random.jsonl', [dict(question_id='0', question='No image?',
                                                    answer='no')])
  config.eval.tasks = 'pope_random,mme'
  assert loop.Trainer(config, str(tmp_path / 'run')).run() == 2
  last = read_metrics(str(tmp_path / 'run'))[-1]
  assert last['step'] == 2 and last['eval/errors'] == 1 and 'loss' in last
  assert set(k for k in last if k.startswith('eval/')) == {'eval/errors',
                                                           'eval/mme/mme_perception_score'}
