"""Scoring equal to lmms-eval 0.7.3's: crafted answers for every supported task, with each trap of
its scoring, scored by the project (`runner.score`, the tasks' aggregations) and by lmms-eval's
own task code (its task YAML's process_results and aggregations, after the reasoning-tag
stripping of its command line): per-sample values and aggregates must be equal, with the default
tags and with stripping off. Prompts, metric names and generation limits are compared too.

lmms-eval is used as files, not installed with its (large) dependencies: an installed lmms_eval
0.7.3 (`pip install --no-deps lmms-eval==0.7.3`), else its wheel, fetched with
`pip download --no-deps` into pytest's cache. Its package `__init__` files, which import that
whole dependency set, are not run: `lmms_eval`, `lmms_eval.tasks` and `lmms_eval.api.registry`
are stand-ins, and cv2, datasets and sacrebleu, which the task utils import without using them to
score, are empty modules while they load; pandas and loguru (the `test` extra) and PyYAML are
real.
"""

import ast
import copy
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from lavi_jax.eval import __main__ as cli
from lavi_jax.eval import runner, scoring, tasks

VERSION = '0.7.3'
# Project task -> lmms-eval task file; mmbench_en_dev scores as mmbench_en_dev_static (no judge).
YAMLS = {'mme': 'mme/mme.yaml', 'mmbench_en_dev': 'mmbench/mmbench_en_dev_static.yaml',
         'gqa': 'gqa/gqa.yaml', 'scienceqa_img': 'scienceqa/scienceqa_img.yaml',
         'textvqa_val': 'textvqa/textvqa_val.yaml', 'vqav2_val': 'vqav2/vqav2_val.yaml',
         'seedbench': 'seedbench/seedbench.yaml', 'videomme': 'videomme/videomme.yaml',
         **{name: f'pope/{name}.yaml' for name in ('pope', 'pope_random', 'pope_pop', 'pope_adv')},
         **{name: f'mvbench/{name}.yaml' for name in tasks.GROUPS['mvbench']}}
NOT_SCORES = {'submission'}  # files for the benchmarks' servers, not written here


def _package_dir(cache: Path) -> Path:
  """The lmms_eval folder of lmms-eval 0.7.3: installed, else from its wheel (downloaded once)."""
  try:
    if importlib.metadata.version('lmms_eval') == VERSION:
      return Path(importlib.util.find_spec('lmms_eval').submodule_search_locations[0])
  except importlib.metadata.PackageNotFoundError:
    pass
  folder = cache / f'lmms_eval-{VERSION}'
  if not folder.exists():
    download = Path(tempfile.mkdtemp(dir=cache))
    try:
      done = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet',
                             '--dest', str(download), f'lmms-eval=={VERSION}'],
                            capture_output=True, text=True, timeout=600)
      if done.returncode:
        pytest.skip(f'lmms-eval {VERSION} cannot be imported: not installed, and pip download '
                    f'failed: {done.stderr.strip()[-500:]}')
      zipfile.ZipFile(next(download.glob('*.whl'))).extractall(download / 'files')
      try:
        (download / 'files').rename(folder)
      except OSError:  # another test process got there first
        pass
    finally:
      shutil.rmtree(download)
  return folder / 'lmms_eval'


class _Loader(yaml.SafeLoader):
  """lmms-eval's task YAML: `!function module.name` as ('function', 'module.name')."""


_Loader.add_constructor('!function', lambda loader, node: ('function',
                                                           loader.construct_scalar(node)))


class Reference:
  """lmms-eval's code for one task, from its task YAML (includes merged)."""

  def __init__(self, lmms, path: str, output_dir: Path):
    self.lmms, self.folder = lmms, path.split('/')[0]
    self.config = self._read(path)
    self.output_dir = output_dir
    self.metrics = {m['metric']: m for m in self.config['metric_list']}

  def _read(self, path: str) -> dict:
    config = yaml.load((self.lmms.root / 'tasks' / path).read_text(), _Loader)
    if 'include' in config:
      config = {**self._read(f'{self.folder}/{config.pop("include")}'), **config}
    return config

  def _function(self, value):
    module, name = value[1].rsplit('.', 1)
    return getattr(importlib.import_module(f'lmms_eval.tasks.{self.folder}.{module}'), name)

  def prompt(self, doc) -> str:
    kwargs = self.config.get('lmms_eval_specific_kwargs')
    to_text = self._function(self.config['doc_to_text'])
    if kwargs is None:
      return to_text(doc)
    return to_text(doc, dict(kwargs, **kwargs.get('default', {})))

  def process(self, doc, answer: str) -> dict:
    """process_results, or the generate_until default: the registered metric (exact_match) of
    the stripped answer against doc_to_target, with the metric's YAML options."""
    if 'process_results' in self.config:
      values = self._function(self.config['process_results'])(doc, [answer])
      return {m: v for m, v in values.items() if m not in NOT_SCORES}
    assert set(self.metrics) == {'exact_match'}
    options = {k: v for k, v in self.metrics['exact_match'].items()
               if k not in ('metric', 'aggregation', 'higher_is_better')}
    return {'exact_match': self.lmms.metrics.exact_match_fn(
        references=[doc[self.config['doc_to_target']]], predictions=[answer.strip()],
        **options)['exact_match']}

  def aggregate(self, metric: str, values: list):
    aggregation = self.metrics[metric]['aggregation']
    if aggregation == 'mean':
      return self.lmms.metrics.mean(values)
    function = self._function(aggregation)
    if 'args' in inspect.signature(function).parameters:
      return function(values, args=types.SimpleNamespace(output_path=str(self.output_dir)))
    return function(values)


def _cli_default(source: str, flag: str) -> str:
  """The default of an argparse option in a source file."""
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == flag):
      return next(k.value.value for k in node.keywords if k.arg == 'default')
  raise KeyError(flag)


def _module(name: str, path: Path | None = None, **attributes) -> types.ModuleType:
  """A stand-in module: a package over `path`, or attributes only."""
  module = types.ModuleType(name)
  if path is not None:
    module.__path__ = [str(path)]
  module.__dict__.update(attributes)
  return module


# The task utils that the YAMLS name (imported while the unused modules stand in).
UTILS = ['mme.utils', 'pope.utils', 'mmbench.en_utils', 'gqa.utils', 'scienceqa.utils',
         'textvqa.utils', 'vqav2.utils', 'seedbench.utils', 'videomme.utils', 'mvbench.utils']


@pytest.fixture(scope='module')
def lmms(request, tmp_path_factory):
  cache = getattr(request.config, 'cache', None)  # None without pytest's cache plugin
  root = _package_dir(cache.mkdir('lmms_eval') if cache else tmp_path_factory.mktemp('lmms'))
  identity = lambda *args, **kwargs: (lambda f: f)
  sys.modules.update({
      'lmms_eval': _module('lmms_eval', root),
      'lmms_eval.tasks': _module('lmms_eval.tasks', root / 'tasks'),
      'lmms_eval.api.registry': _module('lmms_eval.api.registry', register_metric=identity,
                                        register_aggregation=identity)})
  unused = {name: _module(name, **attributes) for name, attributes in (
      ('cv2', {}), ('sacrebleu', {}), ('datasets', dict(Dataset=object, load_dataset=None)))
            if importlib.util.find_spec(name) is None}
  sys.modules.update(unused)
  try:
    for name in UTILS:
      importlib.import_module(f'lmms_eval.tasks.{name}')
    metrics = importlib.import_module('lmms_eval.api.metrics')
  finally:
    for name in unused:
      del sys.modules[name]
  return types.SimpleNamespace(
      root=root, metrics=metrics,
      reasoning=importlib.import_module('lmms_eval.api.reasoning'),
      default_tags=_cli_default((root / '__main__.py').read_text(), '--reasoning_tags'),
      vqa=importlib.import_module('lmms_eval.tasks._task_utils.vqa_eval_metric'),
      mvbench=sys.modules['lmms_eval.tasks.mvbench.utils'])


# Crafted answers -------------------------------------------------------------------------------

def _mme(image, category, answer, response):
  return dict(question_id=image, category=category, answer=answer,
              question='Is there a dog? Please answer yes or no.'), response


MME = [
    _mme('e1.png', 'existence', 'Yes', 'Yes'), _mme('e1.png', 'existence', 'No', 'no.'),
    _mme('e2.png', 'existence', 'Yes', '<think>No way.</think>\nYes'),
    _mme('e2.png', 'existence', 'No', '<analysis>yes</analysis> No'),
    _mme('c1.png', 'count', 'Yes', 'YES'), _mme('c1.png', 'count', 'No', 'Nope, none'),
    # tags are case-sensitive; 'I th' holds neither yes nor no
    _mme('c2.png', 'count', 'Yes', '<THINK>no</THINK> yes'),
    _mme('c2.png', 'count', 'No', 'I think not'),
    _mme('o1.png', 'OCR', 'Yes', 'y'), _mme('o1.png', 'OCR', 'No', '</think>No'),  # prefilled
    _mme('k1.png', 'code_reasoning', 'No', 'n'),
    _mme('k1.png', 'code_reasoning', 'Yes', '<think>unclosed yes'),
    _mme('k2.png', 'code_reasoning', 'Yes', 'Yes.'),
    _mme('k2.png', 'code_reasoning', 'No', 'no, it is not'),
    _mme('n1.png', 'numerical_calculation', 'Yes', '<think>a</think><think>b</think>Yes'),
    _mme('n1.png', 'numerical_calculation', 'No', 'No.'),
    _mme('n2.png', 'numerical_calculation', 'Yes', 'yes'),
    _mme('n2.png', 'numerical_calculation', 'No.', 'NO'),
]

POPE = [(dict(question_id=str(i), answer=answer, question='Is there a dog in the image?'), r)
        for i, (answer, r) in enumerate([
            ('yes', 'Yes'), ('yes', 'Yes.'), ('yes', 'no'), ('no', ' No '), ('no', 'NO'),
            ('no', 'No, there is not'), ('no', 'yes'), ('Yes', '<think>yes?</think>yes'),
            ('no', '</think>no'), ('yes', '<analysis>x</analysis>YES'), ('no', 'maybe')])]


def _mmbench(index, answer, response, hint=None, **options):
  return dict(index=index, question='Which one?', hint=hint, answer=answer, category='c',
              source='s', split='dev', **{'L2-category': 'l2'}, **options), response


ANIMALS = dict(A='cat', B='dog', C='bird', D='fish')
SHIFTED = dict(A='dog', B='bird', C='fish', D='cat')
MMBENCH = [
    # question 1 and its shifts: a letter, '(D).', a letter after a reasoning block
    _mmbench(1, 'A', 'A', **ANIMALS), _mmbench(1_000_001, 'D', 'The answer is (D).', **SHIFTED),
    _mmbench(2_000_001, 'B', '<think>A or C?</think>B', hint='nan', **ANIMALS),
    # a missing option kept as 'nan' takes part in text matching: 'banana' holds it
    _mmbench(2, 'C', 'It is a bird, not a banana', A='cat', B='dog', C='bird', D='nan'),
    _mmbench(1_000_002, 'A', 'a bird', A='bird', B='cat', C='dog', D='nan'),
    # None and NaN options do not; an empty one matches any text
    _mmbench(3, 'B', 'no', A='Yes', B='No', C=None, D=math.nan, hint=math.nan),
    _mmbench(4, 'A', 'red', A='red', B='green', C='blue', D=''),
    # 'A' may be an article in a longer answer: the option text decides
    _mmbench(5, 'A', 'A cat is on the mat', A='cat', B='dog', C='cow', D='nan'),
    # two lone letters: no rule decides, mcq_extract takes the letter at the end
    _mmbench(6, 'C', 'Option C is correct, not B', A='sun', B='moon', C='star', D='nan'),
    # the judge's failure message turns off letter matching
    _mmbench(7, 'B', 'B) Failed to obtain answer via API. C', A='xylophone', B='yacht',
             C='zebra', D='walrus'),
    _mmbench(8, 'B', 'b', A='apple', B='bus', C='car', D='nan'),  # lower case: no letter
    _mmbench(9, 'E', 'E', A='1', B='2', C='3', D='4', E='5'),  # E is a letter, not an option
    _mmbench(10, 'D', 'I pick (D) because of fish', **ANIMALS),
    _mmbench(2_000_011, 'A', 'A', **ANIMALS),  # a shift without its question: not counted
    _mmbench(12, 'A', '', **ANIMALS), _mmbench(13, 'B', ' B ', **ANIMALS),
    _mmbench(14, 'C', 'C) bird', **ANIMALS), _mmbench(15, 'A', 'dog', **ANIMALS),
]

GQA = [(dict(question='Where?', answer=answer), r) for answer, r in [
    ('left', 'Left.'), ('left', 'LEFT'), ('left', 'left side'), ('left', ' left '),
    ('left', '<think>right</think>Left'),
    ('istanbul', 'İstanbul'),  # numpy lower-cases per character: 'İ' -> 'i'
    ('left', 'left\x00'), ('its', "it's"), ('Yes', 'yes!'), ('red car', 'red  car')]]


def _sqa(response, hint=''):
  return dict(question='Which?', hint=hint, choices=['x', 'y', 'z'], answer=2,
              image=None), response


SCIENCEQA = [_sqa(r) for r in ('C', 'c', 'C. z', 'c. z', 'The answer is C', 'C.', '(C)',
                               '<think>A</think>C', 'B. y', 'C z', '<analysis>c</analysis>', ' C ')]
SCIENCEQA.append(_sqa('C', hint='A hint.'))

TEXT_ANSWERS = ['coffee'] * 6 + ['Coffee Shop'] * 2 + ['two', "don't know"]
TEXTVQA = [(dict(question_id=i, question='what is written here?', answers=TEXT_ANSWERS), r)
           for i, r in enumerate(['Coffee', 'coffee.', 'the coffee shop', '2', 'dont know',
                                  'COFFEE' + '.' * 33 + ' cup', '.' * 40 + 'coffee',
                                  '<think>cup</think>coffee', 'coffee?', 'coffee,'])]


def _vqa(question_id, response, answers, ids=True):
  return dict(question_id=question_id, question='How many?', answers=[
      dict(answer=a, answer_confidence='yes', **({'answer_id': i} if ids else {}))
      for i, a in enumerate(answers)]), response


VQAV2 = [
    _vqa(0, 'Two', ['2'] * 3 + ['two'] + ['3'] * 6),
    _vqa(1, 'the Dog', ['the dog'] * 10),  # the humans agree: answers still processed
    _vqa(2, 'yes.', ['yes', 'yes'] + ['no'] * 8), _vqa(3, 'No', ['no'] * 10),
    _vqa(4, 'yes', ['yes'] * 4 + ['no'] * 6, ids=False),  # equal records leave together
    _vqa(5, "man's hat", ["man's hat"] * 5 + ['hat'] * 5),
    _vqa(6, 'red?', ['red'] * 10), _vqa(7, '1,000', ['1000'] * 5 + ['1,000'] * 5),
    _vqa(8, 'dog' + '.' * 33, ['dog'] * 10), _vqa(9, '<think>3</think>two', ['2'] * 10),
]


def _seed(kind, answer, response):
  return dict(question='What?', choice_a='a', choice_b='b', choice_c='c', choice_d='d',
              answer=answer, data_type=kind, question_id=f'{kind}-{response}'), response


SEEDBENCH = [_seed('image', 'A', 'A'), _seed('image', 'A', 'a'), _seed('image', 'B', 'Because'),
             _seed('image', 'C', ' C.'), _seed('image', 'B', '(B)'),
             _seed('video', 'B', '<think>D</think>B'), _seed('video', 'c', 'C'),
             _seed('video', 'D', 'd) four'), _seed('video', 'A', '')]


def _videomme(answer, response, i):
  return dict(question_id=f'{i}', videoID='v', duration='short', domain='Knowledge',
              sub_category='Humanity & History', task_type='Counting Problem',
              question='How many?', options=['A. 1', 'B. 2', 'C. 3', 'D. 4'],
              answer=answer), response


VIDEOMME = [_videomme(a, r, i) for i, (a, r) in enumerate([
    ('B', 'The best answer is B'), ('B', 'b'), ('C', '(C)'), ('D', 'I think it is D.'),
    ('A', 'I am not sure about this one at all, it could be anything really'),
    ('C', 'A and B are wrong; the answer is C'), ('D', '<think>A</think>D'), ('A', 'E'),
    ('B', 'Both (A) and (B)'), ('C', 'C. 3'), ('A', ''), ('B', 'Answer: B, since...'),
    ('d', 'D'),  # right per sample (case ignored), wrong in the aggregate (case-sensitive)
    ('C', 'answer: D'), ('A', 'AB'), ('B', 'B) no, C'), ('D', 'None of them.'),
])]

MVBENCH = [(dict(question='How many?', candidates=['1', '2', '3'], answer='2', video='x.mp4'),
            r) for r in ('(B) 2', 'B. two', 'b. two', 'A', '.', '', 'b', ' B ', '()',
                         '1,,2 x-B', '1,2 x-B',  # MVBench's own digit,digit comma test
                         '<think>(A)</think>(B)', 'The answer is (B)', 'E. none')]
# Letters past E are no letters to MVBench: the answer 'F' is compared as text.
MVBENCH.append((dict(MVBENCH[0][0], candidates=list('123456'), answer='6'), 'F'))

CASES = {'mme': MME, 'mmbench_en_dev': MMBENCH, 'gqa': GQA, 'scienceqa_img': SCIENCEQA,
         'textvqa_val': TEXTVQA, 'vqav2_val': VQAV2, 'seedbench': SEEDBENCH,
         'videomme': VIDEOMME, **{name: POPE for name in tasks.GROUPS['pope_all'] + ['pope']},
         **{name: MVBENCH for name in tasks.GROUPS['mvbench']}}


# Tests ------------------------------------------------------------------------------------------

def test_every_task_has_lmms_eval_names_prompts_and_limits(lmms, tmp_path):
  assert set(YAMLS) == set(CASES) == set(tasks.TASKS)
  for name, task in tasks.TASKS.items():
    ref = Reference(lmms, YAMLS[name], tmp_path)
    assert ref.config['task'] == (name if name != 'mmbench_en_dev' else 'mmbench_en_dev_static')
    assert list(task.metrics) == [m for m in ref.metrics if m not in NOT_SCORES], name
    assert task.max_new_tokens == ref.config['generation_kwargs'].get(
        'max_new_tokens', tasks.DEFAULT_MAX_NEW_TOKENS), name
    for doc, _ in CASES[name]:
      assert task.prompt(doc) == ref.prompt(copy.deepcopy(doc)), (name, doc)


@pytest.mark.parametrize('tags', ['default', 'none'])
@pytest.mark.parametrize('name', list(CASES))
def test_scores_equal_lmms_eval(lmms, tmp_path, name, tags):
  """Per-sample values and aggregates of the crafted answers, with lmms-eval's default
  --reasoning_tags and with 'none' (given to both command lines' parsers)."""
  task, ref = tasks.TASKS[name], Reference(lmms, YAMLS[name], tmp_path)
  value = lmms.default_tags if tags == 'default' else tags
  ours_tags = cli.reasoning_tags(value)
  their_tags = lmms.reasoning.parse_reasoning_tags_config(cli_value=value)
  assert ours_tags == their_tags
  ours, theirs = defaultdict(list), defaultdict(list)
  for doc, response in CASES[name]:
    answer, values = runner.score(task, copy.deepcopy(doc), response, ours_tags)
    if their_tags is not None:
      assert answer == lmms.reasoning.strip_reasoning_tags(response, their_tags)
    expected = ref.process(copy.deepcopy(doc), answer)
    assert values == expected, (doc, response)
    for metric in values:
      ours[metric].append(values[metric])
      theirs[metric].append(expected[metric])
  aggregates = {m: aggregate(ours[m]) for m, aggregate in task.metrics.items() if ours[m]}
  assert aggregates == {m: ref.aggregate(m, theirs[m]) for m in theirs}
  assert len(aggregates) == len(task.metrics)


def test_shared_normalisation_tables_equal_lmms_eval(lmms):
  from lavi_jax.eval import vqa_normalize
  evalai = lmms.vqa.EvalAIAnswerProcessor
  assert vqa_normalize.CONTRACTIONS == evalai.CONTRACTIONS
  assert vqa_normalize.NUMBERS == {k: v for k, v in evalai.NUMBER_MAP.items() if k != v}
  assert list(vqa_normalize.ARTICLES) == evalai.ARTICLES
  assert list(vqa_normalize.PUNCTUATION) == evalai.PUNCTUATIONS
  assert vqa_normalize.PERIOD_STRIP.pattern == evalai.PERIOD_STRIP.pattern
  assert vqa_normalize.COMMA_STRIP.pattern == evalai.COMMA_STRIP.pattern
  assert tasks.MVBENCH_VIDEOS == lmms.mvbench.DATA_LIST


def test_mcq_extract_equals_lmms_eval(lmms):
  from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
  responses = ['', '  ', 'A', 'b', '(C)', 'D.', 'E:', 'F)', 'G ', 'H', 'the answer is B',
               'I choose: C', '.,A,.', '(C) or B,"', 'Answer: A or B? Both (C) and (D).', 'xyz',
               'Apple', 'It is A', 'C is wrong, the correct answer is D', '答案是B', 'A.B.C',
               'ABBA', 'Surely (B), not AD']
  for response in responses:
    for choices in (None, [], ['A', 'B', 'C', 'D']):
      assert scoring.mcq_extract(response, choices or ()) == \
          extract_mcq_answer(response, choices), (response, choices)
