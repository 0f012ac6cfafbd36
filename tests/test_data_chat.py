"""Chat templates render exactly, mask only the answers, and truncate by whole turns."""

import numpy as np
import pytest

from lavi_jax.data import chat, synthetic
from lavi_jax.data.errors import DataError
from lavi_jax.data.tokenizer import load_tokenizer
from tests.data_files import conversation, train_sentencepiece

CONVERSATION = conversation('<image>\nWhat colour is the circle?', 'red',
                            'How many shapes are there?', '3')


def test_chatml_renders_exactly():
  text, spans, ends = chat.render(CONVERSATION, chat.CHATML)
  assert text == ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
                  '<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n'
                  '<|im_start|>assistant\nred<|im_end|>\n'
                  '<|im_start|>user\nHow many shapes are there?<|im_end|>\n'
                  '<|im_start|>assistant\n3<|im_end|>\n')
  assert [text[s:e] for s, e in spans] == ['red<|im_end|>', '3<|im_end|>']
  assert ends[-1] == len(text) and text[:ends[0]].endswith('red<|im_end|>\n')


def test_vicuna_v1_renders_exactly():
  text, spans, ends = chat.render(CONVERSATION, chat.VICUNA_V1)
  assert text == ('A chat between a curious user and an artificial intelligence assistant. The '
                  "assistant gives helpful, detailed, and polite answers to the user's "
                  'questions. USER: <image>\nWhat colour is the circle? ASSISTANT: red</s>'
                  'USER: How many shapes are there? ASSISTANT: 3</s>')
  assert [text[s:e] for s, e in spans] == [' red</s>', ' 3</s>']
  assert ends == [text.index('USER: How'), len(text)]


@pytest.mark.parametrize('template, answers', [
    (chat.CHATML, 'red<|im_end|>3<|im_end|>'), (chat.VICUNA_V1, ' red</s> 3</s>')])
def test_answer_mask_covers_only_answers(template, answers):
  tok = synthetic.synthetic_tokenizer()
  out = chat.tokenize_chat(CONVERSATION, tok, template, max_len=200)
  assert tok.decode(out.ids[out.answer_mask]) == answers
  assert tok.decode(out.ids) == ('<s>' if template.bos else '') + chat.render(
      CONVERSATION, template)[0]
  assert not out.truncated and out.turns == 2


def test_answer_mask_with_sentencepiece(tmp_path):
  tok = load_tokenizer(train_sentencepiece(tmp_path / 'sp.model'))
  turns = conversation('<image>\nwhat colour is the fox', 'brown fox', 'the lazy one', 'dog')
  out = chat.tokenize_chat(turns, tok, chat.VICUNA_V1, max_len=500)
  assert out.ids[0] == tok.bos_id and not out.answer_mask[0]
  expected = tok.encode('brown fox') + [tok.eos_id] + tok.encode('dog') + [tok.eos_id]
  assert out.ids[out.answer_mask].tolist() == expected
  assert out.ids.tolist().count(tok.image_id) == 1


def test_truncation_drops_whole_turns_and_never_cuts_a_placeholder():
  tok = synthetic.synthetic_tokenizer()
  turns = conversation('<image>\nWhat colour is the circle?', 'red',
                       '<image>\nHow many shapes are there?', '2',
                       '<video>\nWhich way is the red circle moving?', 'up')
  full = chat.tokenize_chat(turns, tok, chat.CHATML, max_len=1000)
  pair_lengths = [len(chat.tokenize_chat(turns[:2 * k], tok, chat.CHATML, 1000).ids)
                  for k in (1, 2, 3)]
  assert pair_lengths[-1] == len(full.ids)
  for max_len in range(pair_lengths[0], len(full.ids) + 1):
    out = chat.tokenize_chat(turns, tok, chat.CHATML, max_len)
    kept = sum(length <= max_len for length in pair_lengths)
    fresh = chat.tokenize_chat(turns[:2 * kept], tok, chat.CHATML, 1000)
    assert out.turns == kept and out.truncated == (kept < 3)
    np.testing.assert_array_equal(out.ids, fresh.ids)
    np.testing.assert_array_equal(out.answer_mask, fresh.answer_mask)
    placeholders = np.isin(out.ids, [tok.image_id, tok.video_id]).sum()
    assert placeholders == kept  # one per kept pair: none was cut


def test_first_turn_too_long_is_an_error():
  with pytest.raises(DataError, match='first turn needs .* max_text_len=8'):
    chat.tokenize_chat(CONVERSATION, synthetic.synthetic_tokenizer(), chat.CHATML, 8)


@pytest.mark.parametrize('turns, message', [
    ([], 'non-empty list'),
    (None, 'non-empty list'),
    (conversation('q'), 'must end with a gpt turn'),
    ([{'from': 'gpt', 'value': 'a'}, {'from': 'human', 'value': 'q'}],
     "turn 0 must be from 'human'"),
    ([{'from': 'human', 'value': 'q'}, {'from': 'gpt'}], 'turn 1 has no text'),
])
def test_malformed_conversations_are_named(turns, message):
  with pytest.raises(DataError, match=message):
    chat.render(turns, chat.CHATML)


def test_unknown_template_is_named():
  with pytest.raises(ValueError, match="'llama3'.*chatml"):
    chat.get_template('llama3')
