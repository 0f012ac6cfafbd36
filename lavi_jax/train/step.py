"""The jitted train step: masked next-token loss, gradient accumulation, optimizer update.

Batch (global arrays; see lavi_jax.data.pipeline): input_ids, text_mask, targets, loss_mask
(B, T); images / videos dicts (B, F, S, S, 3) pixels with (B, F) masks and item indices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lavi_jax.models import LaVi
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train.state import TrainState

MODEL_INPUTS = ('input_ids', 'text_mask', 'images', 'videos')
DATA_COUNTERS = ('num_skipped', 'num_truncated')


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def loss_sums(model: LaVi, params, batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(summed masked NLL, (number of loss tokens, number predicted correctly))."""
  logits = model.apply({'params': params}, **model_inputs(batch))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, batch['targets'][..., None], axis=-1)[..., 0]
  mask = batch['loss_mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == batch['targets']).astype(jnp.float32) * mask
  return jnp.sum(nll * mask), (jnp.sum(mask), jnp.sum(correct))


def _micro_batches(batch, steps: int):
  """Leading axis B -> (steps, B / steps)."""
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by accumulation_steps={steps}')
    return x.reshape((steps, x.shape[0] // steps) + x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(config: ml_collections.ConfigDict, stage: opt_lib.Stage,
                    tx: optax.GradientTransformation) -> Callable[[TrainState, Any], Any]:
  """train_step(state, batch) -> (state, metrics) for one stage (not jitted here).

  Gradients flow only to the stage's trainable parameters; the loss is the mean over all loss
  tokens of the global batch, however it is split into accumulation steps.
  """
  model = LaVi(config.model)
  steps = config.train.accumulation_steps
  schedule = opt_lib.learning_rate_schedule(stage, config.train)

  def train_step(state: TrainState, batch):
    trainable, frozen = opt_lib.split(state.params, stage.config.trainable)
    grad_fn = jax.value_and_grad(
        lambda t, b: loss_sums(model, opt_lib.merge(t, frozen), b), has_aux=True)

    def accumulate(carry, micro):
      (loss, (count, correct)), grads = grad_fn(trainable, micro)
      g, l, n, c = carry
      return (jax.tree.map(jnp.add, g, grads), l + loss, n + count, c + correct), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, 0.0, 0.0, 0.0)
    (grads, loss, count, correct), _ = jax.lax.scan(accumulate, init,
                                                    _micro_batches(batch, steps))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=opt_lib.merge(trainable, frozen),
                              opt_state=opt_state)
    metrics = dict(loss=loss / count, accuracy=correct / count, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step - stage.start), loss_tokens=count,
                   text_tokens=jnp.sum(batch['text_mask']))
    for counter in DATA_COUNTERS:  # bad records skipped, conversations truncated
      if counter in batch:
        metrics[counter] = jnp.sum(batch[counter])
    return new_state, metrics

  return train_step


def make_eval_step(config: ml_collections.ConfigDict) -> Callable[[Any, Any], Any]:
  """eval_step(params, batch) -> (B, T) argmax predictions (compare with batch['targets'])."""
  model = LaVi(config.model)

  def eval_step(params, batch):
    return jnp.argmax(model.apply({'params': params}, **model_inputs(batch)), axis=-1)

  return eval_step
