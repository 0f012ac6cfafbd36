"""Answer extraction and metric aggregation of the benchmarks, equal to lmms-eval 0.7.3's task
utils (lmms_eval/tasks/<task>/utils.py), so that the numbers are theirs.

Per-sample functions take a model response (str); aggregations take the list of per-sample
values that the tasks' `process` functions return.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from lavi_jax.data.errors import DataError
from lavi_jax.eval.vqa_normalize import MVBENCH_COMMA_STRIP, process_punctuation

# lmms-eval's command line default (--reasoning_tags): blocks removed from answers before scoring.
REASONING_TAGS = (('<think>', '</think>'), ('<analysis>', '</analysis>'))


def parse_reasoning_tags(value: str) -> list[list[str]] | None:
  """'default' -> REASONING_TAGS, 'none' -> None (answers scored as they are), else a JSON list
  of [start, end] tag pairs; raises ValueError naming what is wrong."""
  if value == 'none':
    return None
  if value == 'default':
    return [list(pair) for pair in REASONING_TAGS]
  try:
    pairs = json.loads(value)
  except json.JSONDecodeError as e:
    raise ValueError(f'not JSON: {e}') from e
  if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and
                                          all(isinstance(t, str) and t for t in p)
                                          for p in pairs)):
    raise ValueError('expected a list of [start, end] string pairs')
  return pairs


def strip_reasoning_tags(text: str, tag_pairs: Sequence[Sequence[str]]) -> str:
  """lmms-eval's `strip_reasoning_tags`: removes each start...end block (tags case-sensitive;
  an unclosed start tag stays), keeps what follows the last end tag when no start tag is left
  (a prompt that pre-filled the start tag), and strips surrounding whitespace."""
  for start_tag, end_tag in tag_pairs:
    while start_tag in text and end_tag in text:
      start = text.find(start_tag)
      end = text.find(end_tag, start)
      if end == -1:
        break
      text = text[:start] + text[end + len(end_tag):]
    if end_tag in text and start_tag not in text:
      text = text.rsplit(end_tag, 1)[-1]
  return text.strip()


# MME (lmms_eval/tasks/mme/utils.py): the categories summed into each score.
MME_PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene',
                  'landmark', 'artwork', 'OCR')
MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation',
                 'code_reasoning')


def mme_parse(response: str) -> str:
  """'yes', 'no' or 'other': exact yes/no after lower-casing and dropping periods, a lone y/n,
  else yes/no within the first 4 characters."""
  answer = response.lower().strip().replace('.', '')
  if answer in ('yes', 'no'):
    return answer
  if len(answer) == 1:
    return {'y': 'yes', 'n': 'no'}.get(answer, 'other')
  prefix = answer[:4]
  return 'yes' if 'yes' in prefix else 'no' if 'no' in prefix else 'other'


def mme_score(results: Sequence[dict[str, Any]]) -> float:
  """Sum over categories of the mean over images of acc + acc+ (each in [0, 100]): an image's
  two questions give acc = 50 per right answer, acc+ = 100 when both are right.

  results: {'question_id' (the image), 'category', 'score' (0/1)} per question.
  """
  per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in results:
    per_image[r['category']][r['question_id']].append(r['score'])
  averages = []
  for category, images in per_image.items():
    scores = []
    for image, pair in images.items():
      if len(pair) != 2:
        raise DataError(f'MME scores question pairs, but image {image!r} ({category}) has '
                        f'{len(pair)} questions')
      scores.append((sum(pair) == 2) * 100.0 + sum(pair) / 2 * 100.0)
    averages.append(sum(scores) / len(scores))
  return sum(averages)


def pope_counts(results: Sequence[dict[str, str]]) -> dict[str, int]:
  """True/false positives and false negatives of 'yes'; predictions other than exactly 'yes' or
  'no' (after lower-casing and stripping: 'yes.' is neither) count in none."""
  count = lambda gt, pred: sum(r['ground_truth'] == gt and r['prediction'] == pred
                               for r in results)
  return dict(tp=count('yes', 'yes'), fp=count('no', 'yes'), fn=count('yes', 'no'))


def pope_precision(results) -> float:
  c = pope_counts(results)
  return c['tp'] / (c['tp'] + c['fp']) if c['tp'] + c['fp'] else 0.0


def pope_recall(results) -> float:
  c = pope_counts(results)
  return c['tp'] / (c['tp'] + c['fn']) if c['tp'] + c['fn'] else 0.0


def pope_f1(results) -> float:
  p, r = pope_precision(results), pope_recall(results)
  return 2 * p * r / (p + r) if p + r else 0.0


def pope_yes_ratio(results) -> float:
  """As lmms-eval computes it: the share of 'yes' among the ground-truth answers."""
  yes = sum(r['ground_truth'] == 'yes' for r in results)
  no = sum(r['ground_truth'] == 'no' for r in results)
  return yes / (yes + no) if yes + no else 0.0


def mean_score(results: Sequence[dict[str, Any]]) -> float:
  return sum(r['score'] for r in results) / len(results)


def mean(values: Sequence[float]) -> float:
  return sum(values) / len(values)


# Multiple-choice letters (lmms_eval/tasks/_task_utils/mcq_extract.py: extract_mcq_answer).

MCQ_PHRASES = (
    'the answer is', 'answer is', 'the correct answer is', 'correct answer is',
    'the best answer is', 'best answer is', 'the correct option is', 'correct option is',
    'the best option is', 'best option is', 'the choice is', 'choice is', 'the correct choice is',
    'correct choice is', 'i choose', 'i select', 'i pick', 'my answer is', 'my choice is',
    '옵션', '정답은', '답은', '답:', '答案是', '答案为', '选', '答えは')
# Forms of a letter X in the padded text, by priority (after an answer phrase: 7, at the start:
# 10, at the end: 9).
MCQ_FORMS = ((6, '({})'), (5, '{}.'), (4, '{}:'), (3, '{})'), (2, '{} '))


def mcq_extract(response: str, choices: Sequence[str] = ()) -> str:
  """The choice letter (default, or no choices: A-H) in the highest-priority form (a standalone
  letter at the start, at the end, after an answer phrase, '(X)', 'X.', 'X:', 'X)', 'X '), the
  last of that form; else the last letter anywhere; '' if none. Case-sensitive: 'b' is no
  letter."""
  choices = choices or 'ABCDEFGH'
  text = response.strip()
  if not text:
    return ''
  for char in ',.!?;:\'"':  # one after the other, as there
    text = text.strip(char)
  text = f' {text} '
  candidates = []  # (priority, position, letter), in the reference's order
  for priority, form in MCQ_FORMS:
    candidates += [(priority, text.rfind(form.format(c)), c) for c in choices
                   if form.format(c) in text]
  lower = text.lower()
  for phrase in MCQ_PHRASES:
    if phrase in lower:
      after = lower.find(phrase) + len(phrase)
      candidates += [(7, text.find(c, after), c) for c in choices if text.find(c, after) != -1]
  stripped = text.strip()
  candidates += [(10, 0, c) for c in choices if stripped.startswith(c)
                 and (len(stripped) == 1 or not stripped[1].isalpha())]
  candidates += [(9, len(text) - 1, c) for c in choices if stripped.endswith(c)
                 and (len(stripped) == 1 or not stripped[-2].isalpha())]
  if not candidates:
    candidates = [(0, text.rfind(c), c) for c in choices if c in text]
  return max(candidates, key=lambda c: c[:2])[2] if candidates else ''


# MMBench (lmms_eval/tasks/mmbench/mmbench_evals.py, from VLMEvalKit): the rule-based
# evaluation of mmbench_en_dev_static.

def mmbench_options(sample: dict[str, Any]) -> dict[str, str]:
  """The options A-D that answers are matched against (`build_choices`): all but None and NaN,
  so a missing option kept as the string 'nan' (or '') takes part."""
  return {c: sample[c] for c in 'ABCD' if sample[c] is not None and sample[c] == sample[c]}


def mmbench_infer_option(response: str, choices: str = 'ABCDE') -> str | None:
  """The option letter a response names (`can_infer_option`): a lone letter among its words
  (unless 'A' may be an article in a longer answer), else a single 'X.', 'X,', 'X:', 'X)',
  '(X)', ':X', ... form; None for the judge's failure message."""
  if 'Failed to obtain answer via API' in response:
    return None
  words = [w.strip() for w in response.split()]
  count = lambda prefix, suffix: sum(prefix + c + suffix in words for c in choices)
  if count('', '') == 1 and not ('A' in words and len(words) > 3):
    for c in choices:
      if c in words:
        return c
  for prefix, suffix in (('', '.'), ('', ','), ('', ':'), ('', ')'), ('', ').'), ('(', ')'),
                         ('(', ').'), (':', ''), (':', ','), (':', '.'), (':', ')'),
                         (':', ').')):
    if count(prefix, suffix) == 1:
      for c in choices:
        if prefix + c + suffix in words:
          return c
  return None


def mmbench_infer_text(response: str, options: dict[str, Any]) -> str | None:
  """The option whose text (lower case) is the only one contained in the response."""
  response = response.lower()
  found = [k for k, text in options.items() if str(text).lower() in response]
  return found[0] if len(found) == 1 else None


def mmbench_answer(sample: dict[str, Any]) -> str:
  """The letter a sample's `prediction` gives: MMBench's `can_infer` (letter, else option
  text), else `mcq_extract` over the options ('' if neither finds one)."""
  response, options = sample['prediction'], mmbench_options(sample)
  return (mmbench_infer_option(response) or mmbench_infer_text(response, options)
          or mcq_extract(response, sorted(options)))


def mmbench_circular(results: Sequence[dict[str, Any]]) -> float:
  """CircularEval accuracy (%) over the questions (records with index < 1e6): a question counts
  if every record with its index % 1e6 (its circular shifts) is answered right; NaN without
  questions.

  results: lmms-eval's per-record `gpt_eval_score` values ('index', 'answer', 'prediction',
  options 'A'-'E', ...).
  """
  right: dict[int, list[bool]] = defaultdict(list)
  for r in results:
    right[int(r['index']) % 1_000_000].append(mmbench_answer(r) == r['answer'])
  hits = [all(right[int(r['index'])]) for r in results if int(r['index']) < 1_000_000]
  return mean(hits) * 100 if hits else math.nan


def exact_match(response: str, target: str) -> float:
  """lmms-eval's exact_match with ignore_case and ignore_punctuation (GQA), with numpy's string
  operations as there (per-character lower case; trailing NULs ignored)."""
  strip = str.maketrans('', '', string.punctuation)
  prediction, reference = np.char.translate(np.char.lower([response, target]), strip)
  return float(prediction == reference)


def scienceqa_match(response: str, target: str) -> float:
  """Right if the response is the letter (any case), or starts with 'X.' (X upper case) for
  the right letter."""
  response, target = response.strip(), target.strip().lower()
  if response.lower() == target:
    return 1.0
  if len(response) >= 2 and response[0].isupper() and response[1] == '.':
    return float(response[0].lower() == target)
  return 0.0


def seed_letter(response: str) -> str:
  """SEED-Bench: the first character of the stripped response."""
  return response.strip()[:1]


def seed_accuracy(results: Sequence[dict[str, Any]]) -> float:
  """The share of samples whose `pred` is the `answer`, ignoring case and whitespace."""
  return mean([r['pred'].lower().strip() == r['answer'].lower().strip() for r in results])


def videomme_accuracy(results: Sequence[dict[str, Any]]) -> float:
  """% of samples whose `pred_answer` is the `answer` (case-sensitive, unlike the per-sample
  `score`)."""
  return 100 * sum(r['pred_answer'] == r['answer'] for r in results) / len(results)


def mvbench_normalize(answer: str) -> str:
  """MVBench's `mcq_acc` processing: an 'X. ...' answer gives X; else the answer cleaned of
  punctuation (MVBench's own digit,digit comma test) and the first standalone letter A-E
  (upper case), else the cleaned text."""
  match = re.match(r'^([A-E])\.\s*(.+)$', answer.strip(), re.IGNORECASE)
  if match:
    return match.group(1).upper()
  answer = process_punctuation(answer.replace('\n', ' ').replace('\t', ' ').strip(),
                               MVBENCH_COMMA_STRIP)
  answer = answer.strip("'").strip('"').strip(')').strip('(').strip().lower()
  letter = re.search(r'\b([A-E])\b', answer, re.IGNORECASE)
  return letter.group(1).upper() if letter else answer


def mvbench_accuracy(results: Sequence[dict[str, Any]]) -> float:
  """Accuracy (%) over the answered samples: `pred_answer` is the response itself, and only
  an empty one is left out (as lmms-eval; '.' or '()' count, as wrong answers)."""
  answered = [r for r in results if r['pred_answer'] != '']
  return 100 * sum(r['score'] for r in answered) / len(answered) if answered else 0
