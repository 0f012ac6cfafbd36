"""Orbax checkpoints of the train state, the data iterator state and the config.

Layout: `{workdir}/checkpoints/{step}/{state,data,config}`. Saving is asynchronous; the last N
checkpoints are kept plus every K-th step. A checkpoint restores onto any mesh (the target
shardings come from the current config), and a model config that differs from the stored one is
refused with the differing keys named.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lavi_jax import config as lavi_config
from lavi_jax import models
from lavi_jax.train.state import TrainState


class ModelConfigMismatch(ValueError):
  """The checkpoint was written for a different model."""


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


EXECUTION_KEYS = ('model.attention', 'model.attention_block')


def model_config_differences(stored: dict | ml_collections.ConfigDict,
                             current: ml_collections.ConfigDict) -> list[str]:
  """Human-readable differences between a stored model config and `current`."""
  if isinstance(stored, ml_collections.ConfigDict):
    stored = json.loads(stored.to_json_best_effort())
  a = _flat(stored, 'model.')
  b = _flat(json.loads(current.to_json_best_effort()), 'model.')
  for key in EXECUTION_KEYS:  # how the model runs, not what it is
    a.pop(key, None)
    b.pop(key, None)
  return [f'{k}: checkpoint has {a.get(k, "<missing>")!r}, config has {b.get(k, "<missing>")!r}'
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_model_config(stored: dict | ml_collections.ConfigDict, current: ml_collections.ConfigDict, where: str):
  differences = model_config_differences(stored, current)
  if differences:
    raise ModelConfigMismatch(f'{where} was written for a different model:\n  ' +
                              '\n  '.join(differences))


class Checkpointer:
  """Saves and restores (train state, data iterator, config) under `{workdir}/checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.config = config
    self.directory = epath.Path(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        keep_period=config.checkpoint.keep_every or None,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a checkpoint is being written."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_dict(state)),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort()))))

  def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    """Restores the state onto `abstract_state`'s shardings and the iterator in place."""
    stored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    check_model_config(stored['config']['model'], self.config.model,
                       f'checkpoint {self.directory / str(step)}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_dict(abstract_state)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return TrainState(**restored['state'])

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def find_checkpoint(workdir: str, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, epath.Path]:
  """(run config, folder of the train state) of checkpoint `step` (default: the latest)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{workdir} has no checkpoints/ folder: not a training workdir')
  manager = ocp.CheckpointManager(directory,
                                  item_handlers=dict(config=ocp.JsonCheckpointHandler()))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory} holds no finished checkpoint')
  stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return lavi_config.from_json(stored['config']), directory / str(step) / 'state'


def load_params(workdir: str, step: int | None = None,
                abstract_params=None) -> tuple[ml_collections.ConfigDict, Any]:
  """(run config, parameters) of checkpoint `step` (default: the latest) of a training workdir,
  without the optimizer or data state.

  `abstract_params`: ShapeDtypeStructs with shardings to restore onto (default: the stored
  model's shapes on the default device).
  """
  config, state = find_checkpoint(workdir, step)
  if abstract_params is None:
    abstract_params = models.abstract_params(config.model)
  item = {'params': abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      state,
      args=ocp.args.PyTreeRestore(item=item,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True))
  return config, restored['params']


def _as_dict(state: TrainState) -> dict[str, Any]:
  return dict(step=state.step, params=state.params, opt_state=state.opt_state)

