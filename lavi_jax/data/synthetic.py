"""The built-in synthetic "shapes" data, made on the fly, deterministic by (seed, split, index).

Images (S x S) show 1-3 coloured shapes; videos show one shape moving. Every question has a
one-word answer, drawn uniformly from its type's answers, so a model that ignores the pixels
stays at `chance()[type]`:

  colour    <image> What colour is the {shape}?          red, green, blue, yellow
  count     <image> How many shapes are there?           1, 2, 3
  position  <image> Where is the {shape}?                left, right, top, bottom (one shape,
                                                         in the middle of that side)
  yes_no    <image> Is there a {colour} {shape}?         yes, no
  motion    <video> Which way is the {colour} {shape} moving?   left, right, up, down

In an image the shapes have distinct kinds, so "the {shape}" is unambiguous. Splits draw from
different seed streams, so 'test' is held out from 'train'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lavi_jax.data import chat
from lavi_jax.data.tokenizer import HFTokenizer, word_level_tokenizer

COLOURS = {'red': (220, 40, 40), 'green': (30, 160, 60), 'blue': (40, 80, 220),
           'yellow': (235, 200, 30)}
SHAPES = ('circle', 'square', 'triangle')
ANSWERS = {
    'colour': tuple(COLOURS),
    'count': ('1', '2', '3'),
    'position': ('left', 'right', 'top', 'bottom'),
    'yes_no': ('yes', 'no'),
    'motion': ('left', 'right', 'up', 'down'),
}
QUESTION_TYPES = tuple(ANSWERS)  # question_type ids are indices into this
IMAGE_TYPES = QUESTION_TYPES[:4]
SPLITS = ('train', 'validation', 'test')
# Special tokens of the synthetic tokenizer, in id order (configs/tiny.py: <image>=1, <video>=2).
SPECIALS = ('<pad>', '<image>', '<video>', '<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>')
# Grid cell (row, col) of the single shape of a position question.
POSITION_CELLS = {'left': (1, 0), 'right': (1, 2), 'top': (0, 1), 'bottom': (2, 1)}
MOTION_STEPS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}


def chance() -> dict[str, float]:
  """Accuracy of answering without looking, per question type."""
  return {t: 1.0 / len(a) for t, a in ANSWERS.items()}


def questions() -> dict[str, list[str]]:
  """Every question text, per question type (placeholder included)."""
  kinds = [(c, s) for c in COLOURS for s in SHAPES]
  return {
      'colour': [f'<image>\nWhat colour is the {s}?' for s in SHAPES],
      'count': ['<image>\nHow many shapes are there?'],
      'position': [f'<image>\nWhere is the {s}?' for s in SHAPES],
      'yes_no': [f'<image>\nIs there a {c} {s}?' for c, s in kinds],
      'motion': [f'<video>\nWhich way is the {c} {s} moving?' for c, s in kinds],
  }


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float):
  fill = COLOURS[colour]
  if shape == 'circle':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == 'square':
    draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
  else:
    draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)


def _picture(shapes: list[tuple[str, str, float, float]], side: int, r: float) -> np.ndarray:
  """[(shape, colour, cx, cy)] on white -> (S, S, 3) uint8."""
  image = Image.new('RGB', (side, side), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for shape, colour, cx, cy in shapes:
    _draw(draw, shape, colour, cx, cy, r)
  return np.asarray(image)


class SyntheticShapes:
  """Random-access source (grain.RandomAccessDataSource) of raw records (see `sample.py`).

  A `video_fraction` of the records are motion videos of `video_frames` frames.
  """

  def __init__(self, split: str = 'train', size: int = 10_000, seed: int = 0,
               image_size: int = 64, video_frames: int = 8, video_fraction: float = 0.0,
               question_types: tuple[str, ...] = QUESTION_TYPES):
    if split not in SPLITS:
      raise ValueError(f'unknown synthetic split {split!r}; choose from {SPLITS}')
    unknown = [t for t in question_types if t not in QUESTION_TYPES]
    if unknown or not question_types:
      raise ValueError(f'synthetic question types {tuple(question_types)!r}: choose one or more '
                       f'of {QUESTION_TYPES}')
    # Only these types are drawn: motion with probability video_fraction (always when it is the
    # only type), else an image type uniformly; all types give the default stream unchanged.
    self.image_types = tuple(t for t in IMAGE_TYPES if t in question_types)
    self.motion = 'motion' in question_types
    self.split, self.size, self.seed = split, size, seed
    self.image_size, self.video_frames, self.video_fraction = (image_size, video_frames,
                                                               video_fraction)

  def __len__(self) -> int:
    return self.size

  def __repr__(self) -> str:
    return f'SyntheticShapes(split={self.split!r}, size={self.size}, seed={self.seed})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
    draw = rng.random()
    if self.motion and (draw < self.video_fraction or not self.image_types):
      kind = 'motion'
    else:
      kind = self.image_types[rng.integers(len(self.image_types))]
    answer = ANSWERS[kind][rng.integers(len(ANSWERS[kind]))]
    question, visual = getattr(self, f'_{kind}')(rng, answer)
    record = dict(id=f'synthetic/{self.split}/{index}', images=[], videos=[],
                  question_type=QUESTION_TYPES.index(kind),
                  conversations=[{'from': 'human', 'value': question},
                                 {'from': 'gpt', 'value': answer}])
    record['videos' if kind == 'motion' else 'images'].append(visual)
    return record

  # One method per question type: (rng, answer) -> (question, pixels).

  def _scatter(self, rng, objects: list[tuple[str, str]]) -> np.ndarray:
    """Places (shape, colour) objects in distinct cells of a 3 x 3 grid."""
    cell = self.image_size / 3
    cells = rng.choice(9, len(objects), replace=False)
    jitter = rng.uniform(-0.1, 0.1, (len(objects), 2)) * cell
    placed = [(s, c, (k % 3 + 0.5) * cell + jx, (k // 3 + 0.5) * cell + jy)
              for (s, c), k, (jx, jy) in zip(objects, cells, jitter)]
    return _picture(placed, self.image_size, 0.3 * cell)

  def _random_objects(self, rng, n: int) -> list[tuple[str, str]]:
    shapes = rng.choice(SHAPES, n, replace=False)
    return [(str(s), str(rng.choice(list(COLOURS)))) for s in shapes]

  def _colour(self, rng, answer):
    objects = self._random_objects(rng, int(rng.integers(1, 4)))
    target = int(rng.integers(len(objects)))
    objects[target] = (objects[target][0], answer)
    return f'<image>\nWhat colour is the {objects[target][0]}?', self._scatter(rng, objects)

  def _count(self, rng, answer):
    objects = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
               for _ in range(int(answer))]
    return '<image>\nHow many shapes are there?', self._scatter(rng, objects)

  def _position(self, rng, answer):
    shape, colour = self._random_objects(rng, 1)[0]
    cell = self.image_size / 3
    row, col = POSITION_CELLS[answer]
    jx, jy = rng.uniform(-0.1, 0.1, 2) * cell
    pixels = _picture([(shape, colour, (col + 0.5) * cell + jx, (row + 0.5) * cell + jy)],
                      self.image_size, 0.3 * cell)
    return f'<image>\nWhere is the {shape}?', pixels

  def _yes_no(self, rng, answer):
    objects = self._random_objects(rng, int(rng.integers(1, 4)))
    if answer == 'yes':
      shape, colour = objects[int(rng.integers(len(objects)))]
    else:
      shape = str(rng.choice(SHAPES))
      present = {c for s, c in objects if s == shape}
      colour = str(rng.choice([c for c in COLOURS if c not in present]))
    return f'<image>\nIs there a {colour} {shape}?', self._scatter(rng, objects)

  def _motion(self, rng, answer):
    shape, colour = self._random_objects(rng, 1)[0]
    side = self.image_size
    dx, dy = MOTION_STEPS[answer]
    across = rng.uniform(0.3, 0.7) * side  # the coordinate that stays fixed
    travel = np.linspace(0.2, 0.8, self.video_frames) * side
    frames = []
    for t in travel:
      along = t if dx + dy > 0 else side - t
      cx, cy = (along, across) if dx else (across, along)
      frames.append(_picture([(shape, colour, cx, cy)], side, 0.1 * side))
    return f'<video>\nWhich way is the {colour} {shape} moving?', np.stack(frames)


def vocabulary_texts() -> list[str]:
  """Everything the synthetic data and both chat templates write (two-turn conversations)."""
  texts = []
  for kind, qs in questions().items():
    for question in qs + [q.split('\n', 1)[1] for q in qs]:  # also without the placeholder
      for answer in ANSWERS[kind]:
        turns = [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}] * 2
        texts += [chat.render(turns, t)[0] for t in chat.TEMPLATES.values()]
  return texts


def synthetic_tokenizer() -> HFTokenizer:
  """The word-level tokenizer of the synthetic data: <pad>=0, <image>=1, <video>=2, <unk>=3,
  <s>, </s>, <|im_start|>, <|im_end|>, then every word piece; each answer is one token."""
  return word_level_tokenizer(vocabulary_texts(), SPECIALS)
