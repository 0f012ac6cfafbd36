"""Held-out evaluation on the built-in synthetic shapes data.

Accuracy is teacher-forced exact match: a sample is right when every answer token (the one-word
answer and the end-of-turn token) is the model's argmax. It is reported per question type, with
the visual input and with it blanked (every image and frame replaced by the empty white canvas
the shapes are drawn on): a model that uses vision should fall to chance when blanked.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np
from etils import epath

from lavi_jax.data import pipeline, synthetic
from lavi_jax.train import step as step_lib


def blank(batch: dict[str, Any]) -> dict[str, Any]:
  """The batch with every image and frame an empty white canvas."""
  return dict(batch, visual=dict(batch['visual'],
                                 pixels=np.full_like(batch['visual']['pixels'], 255)))


def exact_match(config: ml_collections.ConfigDict, params, batches: Iterable[dict[str, Any]],
                blank_visual: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(correct (S,) bool, question_type (S,) int) over host-local batches."""
  eval_step = jax.jit(step_lib.make_eval_step(config))
  correct, types = [], []
  for batch in batches:
    if blank_visual:
      batch = blank(batch)
    predictions = np.asarray(eval_step(params, step_lib.model_inputs(batch)))
    right = (predictions == batch['targets']) | ~batch['loss_mask']
    correct.append(right.all(axis=1))
    types.append(batch['question_type'])
  return np.concatenate(correct), np.concatenate(types)


def evaluate(config: ml_collections.ConfigDict, params) -> dict[str, dict[str, float]]:
  """{question type or 'overall': {accuracy, blanked, chance, count}} on data.eval_mixture."""
  results = {}
  for blank_visual in (False, True):
    batches = iter(pipeline.make_dataset(config, 'eval'))
    correct, types = exact_match(config, params, batches, blank_visual)
    results['blanked' if blank_visual else 'accuracy'] = (correct, types)
  correct, types = results['accuracy']
  blanked, _ = results['blanked']
  chance = synthetic.chance()
  table = {}
  for index, name in enumerate(synthetic.QUESTION_TYPES):
    rows = types == index
    if rows.any():
      table[name] = dict(accuracy=float(correct[rows].mean()),
                         blanked=float(blanked[rows].mean()), chance=chance[name],
                         count=int(rows.sum()))
  valid = types >= 0
  counts = np.array([table[t]['count'] for t in table])
  table['overall'] = dict(
      accuracy=float(correct[valid].mean()), blanked=float(blanked[valid].mean()),
      chance=float(np.dot(counts, [table[t]['chance'] for t in table]) / counts.sum()),
      count=int(valid.sum()))
  return table


def format_table(table: dict[str, dict[str, float]]) -> str:
  lines = [f'{"question type":<15}{"count":>7}{"accuracy":>10}{"blanked":>10}{"chance":>9}',
           '-' * 51]
  for name, row in table.items():
    if name == 'overall':
      lines.append('-' * 51)
    lines.append(f'{name:<15}{row["count"]:>7}{row["accuracy"]:>10.1%}{row["blanked"]:>10.1%}'
                 f'{row["chance"]:>9.1%}')
  return '\n'.join(lines)


def write(workdir: str, table: dict[str, dict[str, float]]):
  (epath.Path(workdir) / 'eval.json').write_text(json.dumps(table, indent=2))
