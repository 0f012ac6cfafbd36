"""Tokenizers: one interface over SentencePiece `.model` files and Hugging Face `tokenizer.json`
files, plus word-level tokenizers built from a fixed vocabulary (the synthetic data's).

The visual placeholders `<image>` and `<video>` are always single tokens: a tokenizer that
lacks them gets them appended after its vocabulary (as LLaVA does for Qwen2: 151646, 151647).
Special strings in the text (placeholders, `<|im_start|>`, `</s>`, ...) encode to their ids.
"""

from __future__ import annotations

import abc
import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece
import tokenizers
from etils import epath

IMAGE_TOKEN = '<image>'
VIDEO_TOKEN = '<video>'
PLACEHOLDERS = (IMAGE_TOKEN, VIDEO_TOKEN)

# Used when a tokenizer names no pad/eos/bos token itself (first one present wins).
PAD_CANDIDATES = ('<pad>', '<|endoftext|>', '<unk>')
EOS_CANDIDATES = ('<|im_end|>', '</s>', '<|endoftext|>', '<|eot_id|>', '<eos>')
BOS_CANDIDATES = ('<s>', '<|begin_of_text|>', '<bos>')

Offsets = list[tuple[int, int]]


class Tokenizer(abc.ABC):
  """Text <-> token ids. `encode_with_offsets` gives each token's character span."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (ids are in [0, vocab_size))."""

  @abc.abstractmethod
  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """text -> (ids, [(start, end)] character span of each token). No BOS/EOS is added."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text, special tokens written out."""

  @abc.abstractmethod
  def find_id(self, token: str) -> int | None:
    """The id of a single token, or None."""

  def encode(self, text: str) -> list[int]:
    return self.encode_with_offsets(text)[0]

  def token_id(self, token: str) -> int:
    """The id of `token`; KeyError when it is not a single token of this vocabulary."""
    i = self.find_id(token)
    if i is None:
      raise KeyError(f'{token!r} is not a token of this tokenizer')
    return i

  def _first_present(self, candidates: Iterable[str]) -> int | None:
    return next((i for i in map(self.find_id, candidates) if i is not None), None)

  @property
  def image_id(self) -> int:
    return self.token_id(IMAGE_TOKEN)

  @property
  def video_id(self) -> int:
    return self.token_id(VIDEO_TOKEN)


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers.Tokenizer` (tokenizer.json).

  pad/eos/bos come from the arguments, else from the candidate lists above.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str | None = None,
               eos_token: str | None = None, bos_token: str | None = None):
    # Existing placeholders keep their ids (and become unsplittable); missing ones are appended.
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t in PLACEHOLDERS])
    self.tokenizer = tokenizer
    self.pad_id = self.token_id(pad_token) if pad_token else self._first_present(PAD_CANDIDATES)
    if self.pad_id is None:
      self.pad_id = 0
    self.eos_id = self.token_id(eos_token) if eos_token else self._first_present(EOS_CANDIDATES)
    self.bos_id = self.token_id(bos_token) if bos_token else self._first_present(BOS_CANDIDATES)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads tokenizer.json; a tokenizer_config.json beside it names pad/eos/bos tokens."""
    path = epath.Path(path)
    names = {}
    config = path.parent / 'tokenizer_config.json'
    if config.is_file():
      settings = json.loads(config.read_text())
      for key in ('pad_token', 'eos_token', 'bos_token'):
        value = settings.get(key)
        names[key] = value.get('content') if isinstance(value, dict) else value
    return cls(tokenizers.Tokenizer.from_str(path.read_text()), **names)

  def save(self, path: str | os.PathLike):
    """Writes tokenizer.json (placeholders included)."""
    epath.Path(path).write_text(self.tokenizer.to_str())

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_with_offsets(self, text):
    encoding = self.tokenizer.encode(text, add_special_tokens=False)
    return list(encoding.ids), list(encoding.offsets)

  def decode(self, ids):
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)

  def find_id(self, token):
    return self.tokenizer.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model. Its control pieces (`<s>`, `</s>`) and the placeholders are matched
  in the text as whole tokens; the text between them is encoded separately (as LLaVA's
  `tokenizer_image_token` does)."""

  def __init__(self, model_proto: bytes):
    self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    sp = self.processor
    size = sp.get_piece_size()
    self.specials = {sp.id_to_piece(i): i for i in range(size) if sp.is_control(i)}
    for token in PLACEHOLDERS:
      existing = sp.piece_to_id(token)
      if existing != sp.unk_id():
        self.specials[token] = existing
      else:
        self.specials[token] = size
        size += 1
    self._size = size
    self._special_strings = {i: s for s, i in self.specials.items()}
    by_length = sorted(self.specials, key=len, reverse=True)
    self._split = re.compile('(' + '|'.join(map(re.escape, by_length)) + ')')
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else max(sp.unk_id(), 0)
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    return cls(epath.Path(path).read_bytes())

  def __reduce__(self):
    return SentencePieceTokenizer, (self.processor.serialized_model_proto(),)

  @property
  def vocab_size(self) -> int:
    return self._size

  def encode_with_offsets(self, text):
    ids, offsets, start = [], [], 0
    for chunk in self._split.split(text):
      if chunk in self.specials:
        ids.append(self.specials[chunk])
        offsets.append((start, start + len(chunk)))
      elif chunk:
        char_of_byte = [k for k, c in enumerate(chunk) for _ in c.encode()] + [len(chunk)]
        for piece in self.processor.encode(chunk, return_type='proto').pieces:
          ids.append(piece.id)
          offsets.append((start + char_of_byte[piece.begin], start + char_of_byte[piece.end]))
      start += len(chunk)
    return ids, offsets

  def decode(self, ids):
    parts, run = [], []
    for i in ids:
      if i in self._special_strings:
        parts += [self.processor.decode(run), self._special_strings[i]]
        run = []
      else:
        run.append(i)
    return ''.join(parts + [self.processor.decode(run)])

  def find_id(self, token):
    if token in self.specials:
      return self.specials[token]
    i = self.processor.piece_to_id(token)
    return i if i != self.processor.unk_id() or token == self.processor.id_to_piece(i) else None


def word_level_tokenizer(texts: Iterable[str], specials: Sequence[str]) -> HFTokenizer:
  """A word-level tokenizer whose vocabulary is every word piece of `texts`.

  Ids: `specials` in the given order (must include `<unk>`), then the pieces sorted. Pieces are
  GPT-2 byte-level words, so a word after a space is one token ('Ġred') and decoding restores
  the text exactly; anything else becomes `<unk>`.
  """
  pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  split = re.compile('|'.join(map(re.escape, sorted(specials, key=len, reverse=True))))
  pieces = {piece for text in texts for chunk in split.split(text)
            for piece, _ in pre_tokenizer.pre_tokenize_str(chunk)}
  vocab = {token: i for i, token in enumerate(specials)}
  for piece in sorted(pieces - set(specials)):
    vocab[piece] = len(vocab)
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                                for s in specials])
  return HFTokenizer(tokenizer)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A SentencePiece `.model` file, a `tokenizer.json`, or a directory holding either."""
  path = epath.Path(path)
  if path.is_dir():
    for name in ('tokenizer.json', 'tokenizer.model'):
      if (path / name).is_file():
        return load_tokenizer(path / name)
    raise FileNotFoundError(f'{path} holds neither tokenizer.json nor tokenizer.model')
  if not path.is_file():
    raise FileNotFoundError(f'tokenizer file {path} does not exist')
  if path.suffix == '.json':
    return HFTokenizer.from_file(path)
  return SentencePieceTokenizer.from_file(path)
