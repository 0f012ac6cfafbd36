"""The train state (step, parameters, optimizer state of the current stage) and its sharding."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lavi_jax import sharding
from lavi_jax.models import abstract_params, init_params
from lavi_jax.train import lora as lora_lib
from lavi_jax.train import optimizer as opt_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32: optimizer steps done
  params: Any  # nested parameter tree
  opt_state: Any  # optimizer state over the current stage's trainable (flat) parameters


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, trainable_shardings,
                        mesh: Mesh):
  """Optimizer-state leaves that mirror parameters take their shardings; the rest replicate."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, trainable_shardings,
                               transform_non_params=lambda _: replicated)


def init_opt_state(tx, trainable: dict, trainable_shardings: dict, mesh: Mesh):
  """Optimizer state born with the same shardings as the parameters it mirrors."""
  abstract = jax.eval_shape(tx.init, trainable)
  shardings = opt_state_shardings(tx, abstract, trainable_shardings, mesh)
  return jax.jit(tx.init, out_shardings=shardings)(trainable)


def state_shardings(config: ml_collections.ConfigDict, stage: opt_lib.Stage, mesh: Mesh,
                    param_shardings) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings) of a TrainState at `stage`, without allocating anything."""
  params = abstract_params(config.model)
  spec = lora_lib.of_stage(stage.config)
  if spec is not None:
    param_shardings = lora_lib.shardings(param_shardings, params, spec)
    params = lora_lib.abstract(params, spec)
  regex = lora_lib.trainable_regex(stage.config)
  trainable, _ = opt_lib.split(params, regex)
  train_shardings, _ = opt_lib.split(param_shardings, regex)
  tx = opt_lib.make_optimizer(stage, config.train, trainable)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = TrainState(step=replicated, params=param_shardings,
                         opt_state=opt_state_shardings(tx, abstract_opt, train_shardings, mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=abstract_opt)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create(config: ml_collections.ConfigDict, stage: opt_lib.Stage, mesh: Mesh, rng: jax.Array,
           params=None):
  """A fresh TrainState at step 0 (or around given `params`), born sharded.

  Returns (state, param_shardings).
  """
  rules = sharding.rules(config.mesh)
  init_fn = functools.partial(init_params, config.model)
  if params is None:
    params, param_shardings = sharding.init_sharded(init_fn, mesh, rules, rng)
  else:
    param_shardings = sharding.logical_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
    params = jax.device_put(params, param_shardings)
  step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
  state = TrainState(step=step, params=params, opt_state=None)
  return with_stage_optimizer(state, config, stage, mesh, param_shardings), param_shardings


def with_stage_optimizer(state: TrainState, config, stage: opt_lib.Stage, mesh: Mesh,
                         param_shardings, previous: opt_lib.Stage | None = None) -> TrainState:
  """`state` with a fresh optimizer state for `stage`'s trainable parameters.

  The `previous` stage's LoRA adapters (if any) are merged into the weights, and `stage`'s (if
  any) attached fresh (lavi_jax.train.lora). `param_shardings`: the model's parameters'.
  """
  params = state.params
  old = lora_lib.of_stage(previous.config) if previous is not None else None
  if old is not None:
    params = jax.jit(functools.partial(lora_lib.merge, spec=old),
                     out_shardings=param_shardings)(params)
  spec = lora_lib.of_stage(stage.config)
  if spec is not None:
    param_shardings = lora_lib.shardings(param_shardings, params, spec)
    rng = jax.random.fold_in(jax.random.key(config.seed), stage.index)
    params = jax.jit(lambda p, r: lora_lib.attach(p, spec, r),
                     out_shardings=param_shardings)(params, rng)
  regex = lora_lib.trainable_regex(stage.config)
  trainable, _ = opt_lib.split(params, regex)
  train_shardings, _ = opt_lib.split(param_shardings, regex)
  tx = opt_lib.make_optimizer(stage, config.train, trainable)
  return state.replace(params=params,
                       opt_state=init_opt_state(tx, trainable, train_shardings, mesh))
