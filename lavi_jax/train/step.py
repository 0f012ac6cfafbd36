"""The jitted train step: masked next-token loss, gradient accumulation, optimizer update.

Batch (global arrays; see lavi_jax.data.pipeline): input_ids, text_mask, targets, loss_mask
(B, T); the frame pool `visual` (lavi_jax.models.visual), or padded `images` / `videos` dicts
(B, F, S, S, 3) pixels with (B, F) masks and item indices.
"""

from __future__ import annotations

from typing import Any, Callable

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lavi_jax import sharding
from lavi_jax.models import LaVi
from lavi_jax.train import lora as lora_lib
from lavi_jax.train import loss as loss_lib
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train.state import TrainState

MODEL_INPUTS = ('input_ids', 'text_mask', 'images', 'videos', 'visual', 'segment_ids')
DATA_COUNTERS = ('num_skipped', 'num_truncated', 'num_visual_trimmed')


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def loss_sums(model: LaVi, params, batch, chunk: int) -> tuple[jax.Array,
                                                            tuple[jax.Array, jax.Array]]:
  """(summed masked NLL, (number of loss tokens, number predicted correctly)); the logits are
  made `chunk` positions at a time (lavi_jax.train.loss)."""
  hidden = model.apply({'params': params}, **model_inputs(batch), method=LaVi.hidden)
  logits = lambda h: model.apply({'params': params}, h, method=LaVi.logits)
  nll, count, correct = loss_lib.token_sums(logits, hidden, batch['targets'],
                                            batch['loss_mask'], chunk)
  return nll, (count, correct)


def batch_shards() -> int:
  """Devices the batch axis is split over (data x fsdp) in the current mesh (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(mesh.shape[a] for a in sharding.BATCH)


def micro_batches(batch, steps: int, shards: int):
  """Leading axis B (rows, or frame-pool groups) -> (steps, B / steps).

  The batch axis is split over `shards` devices in contiguous blocks; micro-batch k takes the
  k-th part of every device's block, so each micro-batch spreads over all devices as the batch
  does (and a device's frame-pool groups stay with its rows).
  """
  def split(x):
    b = x.shape[0]
    if b % (steps * shards):
      raise ValueError(f'a batch axis of {b} does not split into accumulation_steps={steps} '
                       f'micro-batches over {shards} batch shards')
    x = x.reshape((shards, steps, b // (shards * steps)) + x.shape[1:]).swapaxes(0, 1)
    x = x.reshape((steps, b // steps) + x.shape[3:])
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def visual_work(batch) -> dict[str, jax.Array]:
  """Crops/frames encoded and visual tokens read that hold something (frame-pool batches)."""
  if 'visual' not in batch:
    return {}
  pool = batch['visual']
  return dict(vision_frames=jnp.sum(pool['frame_valid']),
              visual_tokens=jnp.sum(pool['token_mask']),
              visual_slot_use=jnp.mean(pool['frame_valid'].astype(jnp.float32)))


def make_train_step(config: ml_collections.ConfigDict, stage: opt_lib.Stage,
                    tx: optax.GradientTransformation) -> Callable[[TrainState, Any], Any]:
  """train_step(state, batch) -> (state, metrics) for one stage (not jitted here).

  Gradients flow only to the stage's trainable parameters (with LoRA: its adapters, merged into
  the frozen targets before the model runs, and its `trainable` non-targets); the loss is the mean over all loss
  tokens of the global batch, however it is split into accumulation steps.
  """
  model = LaVi(config.model)
  steps = config.train.accumulation_steps
  schedule = opt_lib.learning_rate_schedule(stage, config.train)
  spec = lora_lib.of_stage(stage.config)

  def model_params(trainable, frozen):
    params = opt_lib.merge(trainable, frozen)
    return params if spec is None else lora_lib.merge(params, spec)

  def train_step(state: TrainState, batch):
    trainable, frozen = opt_lib.split(state.params, lora_lib.trainable_regex(stage.config))
    grad_fn = jax.value_and_grad(
        lambda t, b: loss_sums(model, model_params(t, frozen), b, config.train.loss_chunk),
        has_aux=True)

    def accumulate(carry, micro):
      (loss, (count, correct)), grads = grad_fn(trainable, micro)
      g, l, n, c = carry
      return (jax.tree.map(jnp.add, g, grads), l + loss, n + count, c + correct), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, 0.0, 0.0, 0.0)
    (grads, loss, count, correct), _ = jax.lax.scan(
        accumulate, init, micro_batches(batch, steps, batch_shards()))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=opt_lib.merge(trainable, frozen),
                              opt_state=opt_state)
    metrics = dict(loss=loss / count, accuracy=correct / count, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step - stage.start), loss_tokens=count,
                   text_tokens=jnp.sum(batch['text_mask']), **visual_work(batch))
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
