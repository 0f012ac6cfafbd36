"""Answer extraction and metric aggregation of the benchmarks, as lmms-eval's task utils
(lmms_eval/tasks/<task>/utils.py) define them, so that the numbers compare with theirs.

Per-sample functions take a model response (str); aggregations take the list of per-sample
values that the tasks' `process` functions return.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Any, Sequence

from lavi_jax.data.errors import DataError
from lavi_jax.eval.vqa_normalize import process_punctuation

# lmms-eval's command line default (--reasoning_tags): blocks removed from answers before scoring.
REASONING_TAGS = (('<think>', '</think>'), ('<analysis>', '</analysis>'))


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
  total = 0.0
  for category, images in per_image.items():
    scores = []
    for image, pair in images.items():
      if len(pair) != 2:
        raise DataError(f'MME scores question pairs, but image {image!r} ({category}) has '
                        f'{len(pair)} questions')
      scores.append(sum(pair) / 2 * 100 + (sum(pair) == 2) * 100)
    total += sum(scores) / len(scores)
  return total


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


# MMBench (lmms_eval/tasks/mmbench/mmbench_evals.py, from VLMEvalKit): rule-based extraction.

def mmbench_infer_option(response: str, choices: str = 'ABCDE') -> str | None:
  """The option letter a response names: a lone letter among its words (unless 'A' may be an
  article in a longer answer), else a single 'X.', 'X,', 'X:', 'X)', '(X)', ':X', ... form."""
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


def mmbench_infer_text(response: str, options: dict[str, str]) -> str | None:
  """The option whose text (lower case) is the only one contained in the response."""
  response = response.lower()
  found = [k for k, text in options.items() if str(text).lower() in response]
  return found[0] if len(found) == 1 else None


def mmbench_extract(response: str, options: dict[str, str]) -> str | None:
  """MMBench's `can_infer`: the option letter, else the option text; None if neither decides
  (where lmms-eval would ask a GPT judge; such an answer counts as wrong here)."""
  return mmbench_infer_option(response) or mmbench_infer_text(response, options)


def mmbench_circular(results: Sequence[dict[str, Any]]) -> float:
  """CircularEval accuracy (%): a question counts only if every circular shift of its options
  (records with the same index % 1e6) was answered right.

  results: {'index', 'answer', 'extracted'} per record.
  """
  groups: dict[int, list[bool]] = defaultdict(list)
  for r in results:
    groups[int(r['index']) % 1_000_000].append(r['extracted'] == r['answer'])
  return 100 * sum(all(g) for g in groups.values()) / len(groups)


def exact_match(response: str, target: str) -> float:
  """lmms-eval's exact_match with ignore_case and ignore_punctuation (GQA)."""
  strip = str.maketrans('', '', string.punctuation)
  return float(response.lower().translate(strip) == target.lower().translate(strip))


def scienceqa_match(response: str, target: str) -> float:
  """Right if the response is the letter, or starts with 'X.' for the right letter X."""
  if response == target:
    return 1.0
  if len(response) >= 2 and response[0].isupper() and response[1] == '.':
    return float(response[0] == target)
  return 0.0


def seed_letter(response: str) -> str:
  """SEED-Bench: the first character of the stripped response."""
  return response.strip()[:1]


ANSWER_PREFIXES = ('The best answer is', 'The correct answer is', 'The answer is', 'The answer',
                   'The best option isThe correct option is', 'Best answer:Best option:')


def videomme_extract(response: str) -> str:
  """Video-MME: the first of A-D after dropping answer prefixes ('' if none, or if a response
  of more than 10 words names no letter). The prefix list keeps lmms-eval's two joined
  strings (missing commas there)."""
  s = response.strip()
  for prefix in ANSWER_PREFIXES:
    s = s.replace(prefix, '')
  if len(s.split()) > 10 and not re.search('[ABCD]', s):
    return ''
  match = re.search(r'[ABCD]', s)
  return match[0] if match else ''


def mvbench_normalize(answer: str) -> str:
  """MVBench's `mcq_acc` processing: an 'X. ...' answer gives X; else the answer cleaned as
  VQA punctuation and the first standalone letter A-E (upper case), else the cleaned text."""
  match = re.match(r'^([A-E])\.\s*(.+)$', answer.strip(), re.IGNORECASE)
  if match:
    return match.group(1).upper()
  answer = process_punctuation(answer.replace('\n', ' ').replace('\t', ' ').strip())
  answer = answer.strip("'").strip('"').strip(')').strip('(').strip().lower()
  letter = re.search(r'\b([A-E])\b', answer, re.IGNORECASE)
  return letter.group(1).upper() if letter else answer


def mvbench_accuracy(results: Sequence[dict[str, Any]]) -> float:
  """Accuracy (%) over the answered samples: `pred_answer` is the response itself, and only
  an empty one is left out (as lmms-eval; '.' or '()' count, as wrong answers)."""
  answered = [r for r in results if r['pred_answer'] != '']
  return 100 * sum(r['score'] for r in answered) / len(answered) if answered else 0.0
