"""VQA answer normalisation and accuracy, as the official VQA evaluation (EvalAI) computes them.

Ported from the VQA evaluation code (github.com/GT-Vision-Lab/VQA, vqaEval.py) in the form
lmms-eval 0.7.3 uses (lmms_eval/tasks/_task_utils/vqa_eval_metric.py, itself from
facebookresearch/mmf pythia/tasks/processors.py `EvalAIAnswerProcessor`), so that scores equal
theirs: contractions restored, number words to digits, articles and punctuation dropped.

Accuracy of an answer against the (usually 10) human answers: for each human answer left out
in turn, min(#other humans that gave the answer / 3, 1); the mean over the 10 subsets.
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
           'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
# Kept as in the reference, including its "(?!<=" (a typo there for "(?<!"), which never
# matches, so every period not followed by a digit is dropped; at most 32 of them, since the
# reference passes re.UNICODE (32) where `sub` takes its count.
PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')
PERIOD_STRIP_COUNT = int(re.UNICODE)
COMMA_STRIP = re.compile(r'(?<=\d)(\,)+(?=\d)')
MVBENCH_COMMA_STRIP = re.compile(r'(\d)(\,)(\d)')  # MVBench's copy (mvbench/utils.py)
PUNCTUATION = (';', r'/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
               '@', '`', ',', '?', '!')


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
  """Drops punctuation next to a space (or all of it when the text has a digit,digit comma),
  replaces other punctuation by a space, and drops periods not followed by a digit."""
  out = text
  for p in PUNCTUATION:
    if p + ' ' in text or ' ' + p in text or comma_strip.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return PERIOD_STRIP.sub('', out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """Lower case, number words -> digits, articles dropped, contractions restored."""
  words = [NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
  """The full EvalAI normalisation of one answer."""
  answer = answer.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(answer))


def _leave_one_out(prediction: str, answers: Sequence[str], keys: Sequence[Any]) -> float:
  """Mean over the answers of min(#matches among the others / 3, 1), where an answer's others
  are those whose key differs from its key."""
  return statistics.mean(
      min(1, sum(a == prediction for a, k in zip(answers, keys) if k != key) / 3) for key in keys)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """TextVQA (lmms-eval textvqa_process_results): prediction and answers fully normalised; each
  answer left out by its position."""
  answers = [normalize_answer(a) for a in answers]
  return _leave_one_out(normalize_answer(prediction), answers, range(len(answers)))


def vqav2_accuracy(prediction: str, answers: Sequence[dict[str, Any]]) -> float:
  """VQAv2 (lmms-eval vqav2_process_results): the prediction and the answer records' `answer`
  whitespace-cleaned, then punctuation, digits and articles processed (not the full
  normalisation: no dropping of ',' and '?' first); an answer is left out with every record
  equal to its (processed) record, as the reference compares whole records."""
  clean = lambda a: process_digit_article(process_punctuation(
      a.replace('\n', ' ').replace('\t', ' ').strip()))
  records = [dict(r, answer=clean(r['answer'])) for r in answers]
  return _leave_one_out(clean(prediction), [r['answer'] for r in records], records)
