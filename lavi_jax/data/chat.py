"""Chat templates: a LLaVA conversation -> token ids and a mask over the assistant's answers.

A conversation is LLaVA's list of turns `{'from': 'human' | 'gpt', 'value': str}`, alternating
and starting with `human`; placeholders (`<image>`, `<video>`) stay in the text as tokens.

  chatml     (Qwen2; LLaVA-OneVision's `qwen_1_5`):
             <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
             <|im_start|>user\\n{human}<|im_end|>\\n<|im_start|>assistant\\n{gpt}<|im_end|>\\n ...
  vicuna_v1  (LLaMA; LLaVA-1.5's `v1`), after the tokenizer's BOS token:
             {system} USER: {human} ASSISTANT: {gpt}</s>USER: ...

The answer mask covers the tokens of each answer and its closing `<|im_end|>` / `</s>` (for
vicuna_v1 also the space before the answer, which LLaMA's tokenizer may keep as a token `▁`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from lavi_jax.data.errors import DataError
from lavi_jax.data.tokenizer import Tokenizer

Conversation = Sequence[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How turns are written; `user` and `answer` have one `{}` for the message."""
  name: str
  system: str  # before the first turn
  user: str
  assistant: str  # before an answer (not trained)
  answer: str  # the answer and its end token (trained)
  turn_end: str  # after an answer (not trained)
  bos: bool  # starts with the tokenizer's BOS token (when it has one)
  markers: tuple[str, ...]  # strings that must be single tokens of the tokenizer


CHATML = ChatTemplate(
    name='chatml',
    system='<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n',
    user='<|im_start|>user\n{}<|im_end|>\n',
    assistant='<|im_start|>assistant\n',
    answer='{}<|im_end|>',
    turn_end='\n',
    bos=False,
    markers=('<|im_start|>', '<|im_end|>'))
VICUNA_V1 = ChatTemplate(
    name='vicuna_v1',
    system='A chat between a curious user and an artificial intelligence assistant. The '
    "assistant gives helpful, detailed, and polite answers to the user's questions. ",
    user='USER: {} ',
    assistant='ASSISTANT:',
    answer=' {}</s>',
    turn_end='',
    bos=True,
    markers=('</s>',))
TEMPLATES = {t.name: t for t in (CHATML, VICUNA_V1)}


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f'unknown chat template {name!r}; choose from {sorted(TEMPLATES)}')
  return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class TokenizedChat:
  """ids (L,) int32; answer_mask (L,) bool; turns: (human, gpt) pairs kept; truncated: whether
  trailing pairs were dropped to fit the length limit."""
  ids: np.ndarray
  answer_mask: np.ndarray
  turns: int
  truncated: bool


def render(conversation: Conversation, template: ChatTemplate):
  """-> (text, answer spans [(start, end)], end of each (human, gpt) pair), in characters."""
  if not isinstance(conversation, (list, tuple)) or not conversation:
    raise DataError('conversations must be a non-empty list of turns')
  if len(conversation) % 2:
    raise DataError(f'conversations has {len(conversation)} turns; it must end with a gpt turn')
  text, spans, pair_ends = template.system, [], []
  for i, turn in enumerate(conversation):
    expected = 'gpt' if i % 2 else 'human'
    if not isinstance(turn, dict) or turn.get('from') != expected:
      got = turn.get('from') if isinstance(turn, dict) else turn
      raise DataError(f'turn {i} must be from {expected!r}, got {got!r}')
    value = turn.get('value')
    if not isinstance(value, str):
      raise DataError(f'turn {i} has no text value')
    if expected == 'human':
      text += template.user.format(value)
    else:
      text += template.assistant
      start = len(text)
      text += template.answer.format(value)
      spans.append((start, len(text)))
      text += template.turn_end
      pair_ends.append(len(text))
  return text, spans, pair_ends


def _bos(tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
  return [tokenizer.bos_id] if template.bos and tokenizer.bos_id is not None else []


def tokenize_prompt(conversation: Conversation, tokenizer: Tokenizer,
                    template: ChatTemplate) -> np.ndarray:
  """The ids (L,) int32 an answer is generated after: a conversation whose last turn is from
  `human`, rendered as for training, up to where the next answer would start."""
  text, spans, _ = render(list(conversation) + [{'from': 'gpt', 'value': ''}], template)
  return np.array(_bos(tokenizer, template) + tokenizer.encode(text[:spans[-1][0]]), np.int32)


def end_of_answer(template: ChatTemplate) -> str:
  """The token that ends an answer ('<|im_end|>', '</s>')."""
  return template.answer.format('').strip()


def stop_ids(tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
  """The ids generation stops at: the template's end of answer and the tokenizer's eos."""
  return sorted({i for i in (tokenizer.find_id(end_of_answer(template)), tokenizer.eos_id)
                 if i is not None})


def tokenize_chat(conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate,
                  max_len: int) -> TokenizedChat:
  """Renders and tokenizes a conversation, dropping whole trailing (human, gpt) pairs until it
  fits in `max_len` tokens. Raises DataError when even the first pair does not fit."""
  text, spans, pair_ends = render(conversation, template)
  ids, offsets = tokenizer.encode_with_offsets(text)
  starts = np.array([s for s, _ in offsets], np.int64).reshape(-1)
  ends = np.maximum(np.array([e for _, e in offsets], np.int64).reshape(-1), starts + 1)
  mask = np.zeros(len(ids), bool)
  for start, end in spans:
    mask |= (starts < end) & (ends > start)
  prefix = _bos(tokenizer, template)
  # Tokens of the first k pairs (pairs end at special tokens, so the prefix is exact).
  lengths = len(prefix) + np.searchsorted(starts, pair_ends, side='left')
  turns = int(np.sum(lengths <= max_len))
  if turns == 0:
    raise DataError(f'the first turn needs {lengths[0]} tokens, more than max_text_len={max_len}')
  n = lengths[turns - 1] - len(prefix)
  return TokenizedChat(ids=np.array(prefix + ids[:n], np.int32).reshape(-1),
                       answer_mask=np.concatenate([np.zeros(len(prefix), bool), mask[:n]]),
                       turns=turns, truncated=turns < len(pair_ends))
