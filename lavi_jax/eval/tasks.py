"""The benchmark tasks: prompts, visual inputs, generation limits and scoring as lmms-eval 0.7.3's
task definitions (lmms_eval/tasks/<task>/*.yaml and utils.py) have them; task and metric names
are lmms-eval's, per-sample values and aggregates equal theirs.

Deviations from lmms-eval:
- MMBench: `mmbench_en_dev` scores as lmms-eval's `mmbench_en_dev_static` does (rule-based:
  MMBench's `can_infer`, then `mcq_extract`); lmms-eval's `mmbench_en_dev` asks a GPT judge
  where the rules of `can_infer` find no answer. Both name the metric `gpt_eval_score`.
- SEED-Bench: a video question's frames go in as one video (sampled to the run's frame count);
  lmms-eval passes them as separate images.
- The `submission` outputs of MMBench and TextVQA (files for the benchmarks' servers) are not
  written.

A task turns each record (`doc`) of its data file into a prompt with images or a video, scores
the greedy answer per sample (`process`: metric -> per-sample value) and aggregates per metric.
`short_answer` builds the tasks scored by a mean of per-sample scores.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

from etils import epath

from lavi_jax.data.errors import DataError
from lavi_jax.eval import scoring
from lavi_jax.eval.datasets import frames_as_video, media
from lavi_jax.eval.vqa_normalize import textvqa_accuracy, vqav2_accuracy

SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'
LETTER = "Answer with the option's letter from the given choices directly."
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's models' default when a task sets none

Doc = dict[str, Any]
# (doc, folder of the data file) -> (image references, video reference or None)
Visual = Callable[[Doc, epath.Path], tuple[tuple[Any, ...], Any]]


@dataclasses.dataclass(frozen=True)
class Task:
  """name: lmms-eval's task name; data: the data file under --data-dir, without suffix;
  metrics: metric -> aggregation of the per-sample values; headline: the metric logged during
  training."""
  name: str
  data: str
  prompt: Callable[[Doc], str]
  visual: Visual
  target: Callable[[Doc], Any]
  process: Callable[[Doc, str], dict[str, Any]]
  metrics: dict[str, Callable[[list], Any]]
  headline: str
  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
  # Records scored together (MME: an image's question pair); a limit keeps whole groups.
  group: Callable[[Doc], Any] | None = None


def image(doc: Doc, root: epath.Path):
  """The record's single `image`."""
  return (media(doc['image'], root, 'field "image"'),), None


def letters(n: int) -> str:
  return string.ascii_uppercase[:n]


def short_answer(name: str, data: str, prompt: Callable[[Doc], str],
                 score: Callable[[str, Doc], float], target: Callable[[Doc], Any],
                 max_new_tokens: int, visual: Visual = image) -> Task:
  """A task scored by the mean of a per-sample score, reported as `exact_match`."""
  return Task(name, data, prompt, visual, target,
              lambda doc, response: {'exact_match': score(response, doc)},
              {'exact_match': scoring.mean}, 'exact_match', max_new_tokens)


# Yes/no tasks ------------------------------------------------------------------------------

def _mme_prompt(doc: Doc) -> str:
  return doc['question'].strip().replace(' Please answer yes or no.', '') + SHORT_ANSWER


def _mme_process(doc: Doc, response: str) -> dict[str, Any]:
  gold = doc['answer'].lower().strip().replace('.', '')
  key = ('mme_perception_score' if doc['category'] in scoring.MME_PERCEPTION
         else 'mme_cognition_score')
  return {key: {'question_id': doc['question_id'], 'category': doc['category'],
                'score': float(scoring.mme_parse(response) == gold)}}


MME = Task('mme', 'mme/test', _mme_prompt, image, lambda doc: doc['answer'], _mme_process,
           {'mme_perception_score': scoring.mme_score, 'mme_cognition_score': scoring.mme_score},
           'mme_perception_score', max_new_tokens=16, group=lambda doc: doc['question_id'])


def _pope_process(doc: Doc, response: str) -> dict[str, Any]:
  pred, gold = response.lower().strip(), doc['answer'].lower().strip()
  if gold not in ('yes', 'no'):
    raise DataError(f'field "answer" must be yes or no, got {doc["answer"]!r}')
  sample = {'question_id': doc['question_id'], 'score': float(pred == gold),
            'prediction': pred, 'ground_truth': gold}
  return {metric: sample for metric in POPE_METRICS}


POPE_METRICS = {'pope_accuracy': scoring.mean_score, 'pope_precision': scoring.pope_precision,
                'pope_recall': scoring.pope_recall, 'pope_f1_score': scoring.pope_f1,
                'pope_yes_ratio': scoring.pope_yes_ratio}


def pope(name: str, split: str) -> Task:
  return Task(name, f'pope/{split}', lambda doc: doc['question'].strip() + SHORT_ANSWER, image,
              lambda doc: doc['answer'], _pope_process, POPE_METRICS, 'pope_f1_score',
              max_new_tokens=128)


# MMBench (dev, CircularEval with rule-based answer extraction) ------------------------------

def _mmbench_options(doc: Doc) -> dict[str, str]:
  """The options A-E shown in the prompt (lmms-eval drops empty, None and 'nan' ones)."""
  return {c: doc[c] for c in 'ABCDE'
          if doc.get(c) is not None and doc[c] == doc[c] and doc[c] and doc[c] != 'nan'}


def _mmbench_prompt(doc: Doc) -> str:
  options = 'There are several options:\n' + ''.join(
      f'{k}. {v}\n' for k, v in _mmbench_options(doc).items())
  query = f'{doc["question"]} {options.rstrip(chr(10))}'
  hint = doc.get('hint')
  if hint is not None and hint == hint and hint != 'nan':
    query = f'{hint} {query}'
  return f'{query}\n\n{LETTER}'


def _mmbench_process(doc: Doc, response: str) -> dict[str, Any]:
  """lmms-eval's record: the doc's fields, the response, and options A-E with 'nan' for a
  missing one (it then takes part in the answer matching: `scoring.mmbench_options`)."""
  # The dataset's field is 'L2-category'; some exports lower-case it.
  l2 = doc['L2-category'] if 'L2-category' in doc else doc['l2-category']
  record = {'index': doc['index'], 'question': doc['question'], 'answer': doc['answer'],
            'prediction': response.strip(), 'hint': doc['hint'], 'source': doc['source'],
            'split': doc['split'], 'category': doc['category'], 'L2-category': l2}
  return {'gpt_eval_score': dict(record, **{c: doc.get(c, 'nan') for c in 'ABCDE'})}


MMBENCH = Task('mmbench_en_dev', 'mmbench/dev', _mmbench_prompt, image,
               lambda doc: doc['answer'], _mmbench_process,
               {'gpt_eval_score': scoring.mmbench_circular}, 'gpt_eval_score',
               max_new_tokens=1024)


# Short answers ----------------------------------------------------------------------------

GQA = short_answer('gqa', 'gqa/testdev', lambda doc: doc['question'] + SHORT_ANSWER,
                   lambda r, doc: scoring.exact_match(r.strip(), doc['answer']),
                   lambda doc: doc['answer'], max_new_tokens=16)

TEXTVQA = short_answer('textvqa_val', 'textvqa/validation',
                       lambda doc: doc['question'].capitalize() + SHORT_ANSWER,
                       lambda r, doc: textvqa_accuracy(r, doc['answers']),
                       lambda doc: doc['answers'], max_new_tokens=DEFAULT_MAX_NEW_TOKENS)


# VQAv2's answers: [{'answer', 'answer_confidence', 'answer_id'}, ...].
VQAV2 = short_answer('vqav2_val', 'vqav2/validation', lambda doc: doc['question'] + SHORT_ANSWER,
                     lambda r, doc: vqav2_accuracy(r, doc['answers']),
                     lambda doc: [a['answer'] for a in doc['answers']], max_new_tokens=16)


def _sqa_prompt(doc: Doc) -> str:
  choices = '\n'.join(f'{k}. {c}' for k, c in zip(letters(len(doc['choices'])), doc['choices']))
  context = f'Context: {doc["hint"]}\n' if doc['hint'] else ''
  return f'{context}{doc["question"]}\n{choices}\n{LETTER}'


def _sqa_visual(doc: Doc, root: epath.Path):
  return image(doc, root) if doc.get('image') is not None else ((), None)


def _sqa_target(doc: Doc) -> str:
  return letters(len(doc['choices']))[doc['answer']]


SCIENCEQA = short_answer('scienceqa_img', 'scienceqa/test', _sqa_prompt,
                         lambda r, doc: scoring.scienceqa_match(r, _sqa_target(doc)),
                         _sqa_target, max_new_tokens=16, visual=_sqa_visual)


# Multiple choice --------------------------------------------------------------------------

def _seed_prompt(doc: Doc) -> str:
  options = '\n'.join(f'{k}. {doc["choice_" + k.lower()]}' for k in 'ABCD')
  return f'{doc["question"]}\n{options}\n{LETTER}'


def _seed_visual(doc: Doc, root: epath.Path):
  """Image questions: their image; video questions: their frames as one video (lmms-eval:
  separate images)."""
  images = doc['image'] if isinstance(doc['image'], list) else [doc['image']]
  if doc['data_type'] == 'video':
    return (), frames_as_video(images, root, 'field "image"')
  return tuple(media(x, root, 'field "image"') for x in images), None


def _seed_process(doc: Doc, response: str) -> dict[str, Any]:
  sample = {'pred': scoring.seed_letter(response), 'answer': doc['answer'],
            'question_id': doc['question_id']}
  return {f'seed_{doc["data_type"]}': sample, 'seed_all': sample}


SEEDBENCH = Task('seedbench', 'seedbench/test', _seed_prompt, _seed_visual,
                 lambda doc: doc['answer'], _seed_process,
                 {m: scoring.seed_accuracy for m in ('seed_image', 'seed_video', 'seed_all')},
                 'seed_all')


def _videomme_prompt(doc: Doc) -> str:
  return ('Select the best answer to the following multiple-choice question based on the video '
          'and the subtitles. Respond with only the letter (A, B, C, or D) of the correct '
          'option.\n' + doc['question'] + '\n' + '\n'.join(doc['options']) + '\n\n' + LETTER)


def _videomme_visual(doc: Doc, root: epath.Path):
  """data/{videoID}.mp4 (or .MP4, .mkv) next to the data file."""
  for suffix in ('.mp4', '.MP4', '.mkv'):
    path = root / 'data' / (doc['videoID'] + suffix)
    if path.exists():
      return (), str(path)
  return (), str(root / 'data' / (doc['videoID'] + '.mp4'))  # reported missing on load


def _videomme_process(doc: Doc, response: str) -> dict[str, Any]:
  pred, gold = scoring.mcq_extract(response, 'ABCD'), doc['answer']
  return {'videomme_perception_score': {
      'question_id': doc['question_id'], 'duration': doc['duration'], 'category': doc['domain'],
      'sub_category': doc['sub_category'], 'task_category': doc['task_type'],
      'pred_answer': pred, 'answer': gold, 'score': float(pred.lower() == gold.lower()),
      'videoID': doc['videoID']}}


VIDEOMME = Task('videomme', 'videomme/test', _videomme_prompt, _videomme_visual,
                lambda doc: doc['answer'], _videomme_process,
                {'videomme_perception_score': scoring.videomme_accuracy},
                'videomme_perception_score', max_new_tokens=16)

# MVBench sub-task -> its videos' folder under mvbench/video/ (lmms-eval's DATA_LIST).
MVBENCH_VIDEOS = {
    'object_interaction': 'star/Charades_segment', 'action_sequence': 'star/Charades_segment',
    'action_prediction': 'star/Charades_segment', 'action_localization': 'sta/sta_video_segment',
    'moving_count': 'clevrer/video_validation', 'fine_grained_pose': 'nturgbd_convert',
    'character_order': 'perception/videos', 'object_shuffle': 'perception/videos',
    'egocentric_navigation': 'vlnqa', 'moving_direction': 'clevrer/video_validation',
    'episodic_reasoning': 'tvqa/video_fps3_hq_segment',
    'fine_grained_action': 'Moments_in_Time_Raw/videos', 'scene_transition': 'scene_qa/video',
    'state_change': 'perception/videos', 'moving_attribute': 'clevrer/video_validation',
    'action_antonym': 'ssv2_video_mp4', 'unexpected_action': 'FunQA_test/test',
    'counterfactual_inference': 'clevrer/video_validation',
    'object_existence': 'clevrer/video_validation', 'action_count': 'perception/videos',
}


def _mvbench_prompt(doc: Doc) -> str:
  """lmms-eval's prompt; every sub-task's post_prompt is 'Only give the best option.\\n'."""
  options = ''.join(f'({k}) {c}\n' for k, c in zip(letters(len(doc['candidates'])),
                                                   doc['candidates']))
  return f'Question:{doc["question"]}\nOption:\n{options}Only give the best option.\n'


def _mvbench_answer(doc: Doc) -> str:
  if doc['answer'] not in doc['candidates']:
    raise DataError(f'field "answer" {doc["answer"]!r} is not one of the candidates')
  return letters(len(doc['candidates']))[doc['candidates'].index(doc['answer'])]


def _mvbench_process(doc: Doc, response: str) -> dict[str, Any]:
  """lmms-eval keeps the response itself as `pred_answer` (an empty one is unanswered)."""
  gold = _mvbench_answer(doc)
  score = scoring.mvbench_normalize(response) == scoring.mvbench_normalize(gold)
  return {'mvbench_accuracy': {'pred_answer': response, 'gt_answer': gold, 'score': int(score)}}


def mvbench(sub_task: str) -> Task:
  folder = MVBENCH_VIDEOS[sub_task]
  return Task(f'mvbench_{sub_task}', f'mvbench/{sub_task}', _mvbench_prompt,
              lambda doc, root: ((), str(root / 'video' / folder / doc['video'])),
              _mvbench_answer, _mvbench_process, {'mvbench_accuracy': scoring.mvbench_accuracy},
              'mvbench_accuracy', max_new_tokens=16)


TASKS: dict[str, Task] = {t.name: t for t in [
    MME, pope('pope', 'test'), pope('pope_random', 'random'), pope('pope_pop', 'popular'),
    pope('pope_adv', 'adversarial'), MMBENCH, GQA, SCIENCEQA, TEXTVQA, VQAV2, SEEDBENCH,
    VIDEOMME, *(mvbench(s) for s in MVBENCH_VIDEOS)]}
# Names that stand for several tasks.
GROUPS = {'mvbench': [f'mvbench_{s}' for s in MVBENCH_VIDEOS],
          'pope_all': ['pope_random', 'pope_pop', 'pope_adv']}


def resolve(names: str) -> list[Task]:
  """'pope,mme,mvbench' -> the tasks (groups expanded, order kept, no repeats)."""
  out: list[Task] = []
  for name in (n.strip() for n in names.split(',') if n.strip()):
    if name not in TASKS and name not in GROUPS:
      raise ValueError(f'unknown task {name!r}; known: {sorted(TASKS) + sorted(GROUPS)}')
    for member in GROUPS.get(name, [name]):
      if TASKS[member] not in out:
        out.append(TASKS[member])
  return out
