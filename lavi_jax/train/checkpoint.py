"""Orbax checkpoints of the train state, the data iterator state and the config.

Layout: `{workdir}/checkpoints/{step}/{state,data,config}`. Saving is asynchronous; the last N
checkpoints are kept plus every K-th step. A checkpoint restores onto any mesh (the target
shardings come from the current config), and a model config that differs from the stored one is
refused with the differing keys named.

Integrity: once Orbax has committed a step, each process writes `checksums.process_{i}.json`
in the step folder: the size and sha256 of every file it wrote (Orbax's OCDBT array data under
`state/ocdbt.process_{i}/` and its `array_metadatas/process_{i}`, the data iterator's
`data/process_{i}-of-{n}.json`; process 0 also the files Orbax's primary host writes: the merged
`state/manifest.ocdbt` and `state/d/*`, `state/_METADATA`, `state/_sharding`, `config/metadata`,
the step metadata and commit markers). The step metadata records how many manifests the step
must have. A manifest that was never written (the job died between Orbax's commit and the
manifest, or the step predates checksums) leaves those files unverified, with a warning: Orbax's
commit already vouches that they were written completely. A training run resumes from the
newest step that verifies and sets newer ones aside as `{step}.corrupt-{time}` (Orbax ignores
such names); read-only uses (`find_checkpoint`, `load_params`, `check_intact`) refuse a step
that fails, naming the file.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import re
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lavi_jax import config as lavi_config
from lavi_jax import models
from lavi_jax.train import lora as lora_lib
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train.state import TrainState


class ModelConfigMismatch(ValueError):
  """The checkpoint was written for a different model."""


class CorruptCheckpoint(ValueError):
  """A checkpoint's files do not match their checksums."""


MANIFEST = 'checksums.process_{}.json'
_MANIFEST_PREFIX = 'checksums.'
# Orbax's step metadata file; its custom_metadata[_MANIFEST_COUNT] is how many manifests the step
# must have (absent: saved before checksums existed).
_STEP_METADATA = '_CHECKPOINT_METADATA'
_MANIFEST_COUNT = 'checksum_manifests'
_READ_BYTES = 2 ** 24
_MESSAGE_BYTES = 4096  # per process, when several processes pool what they found


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(functools.partial(f.read, _READ_BYTES), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _writer(name: str, process_count: int) -> int:
  """The process that writes file `name` (relative to a step folder) with Orbax: process i
  writes the files named `process_{i}`, the primary host (0) the rest."""
  match = re.search(r'process_(\d+)', name)
  index = int(match.group(1)) if match else 0
  return index if index < process_count else 0


def _files(folder: epath.Path) -> dict[str, epath.Path]:
  """{name relative to `folder`: path} of the files under `folder`, checksum manifests aside."""
  out = {}

  def visit(directory: epath.Path, prefix: str):  # iterdir keeps URLs (gs://) whole
    for child in directory.iterdir():
      if child.is_dir():
        visit(child, f'{prefix}{child.name}/')
      elif not child.name.startswith(_MANIFEST_PREFIX):
        out[prefix + child.name] = child

  visit(folder, '')
  return out


def write_manifest(folder: epath.PathLike, process_index: int = 0,
                   process_count: int = 1) -> epath.Path:
  """Writes `{folder}/checksums.process_{process_index}.json`: {'process_count', 'files':
  {name: {'bytes', 'sha256'}}} of the files this process wrote (all of them when
  `process_count` is 1). Call it once the files are final; it appears complete or not at all."""
  folder = epath.Path(folder)
  files = {name: dict(bytes=path.stat().length, sha256=_sha256(path))
           for name, path in sorted(_files(folder).items())
           if _writer(name, process_count) == process_index}
  manifest = folder / MANIFEST.format(process_index)
  partial = folder / f'{manifest.name}.partial'
  partial.write_text(json.dumps(dict(process_count=process_count, files=files), indent=1))
  partial.rename(manifest)
  return manifest


def _manifest_count(folder: epath.Path) -> int | None:
  """How many manifests `folder` must have: from the step metadata, else as any manifest present
  says; None when it has no checksums (saved before they existed, or a convert.from_hf output
  written without them)."""
  try:
    custom = json.loads((folder / _STEP_METADATA).read_text()).get('custom_metadata') or {}
    if _MANIFEST_COUNT in custom:
      return int(custom[_MANIFEST_COUNT])
  except (OSError, ValueError):
    pass  # no step metadata, or unreadable: manifest 0 covers it and names it below
  for manifest in folder.glob(MANIFEST.format('*')):
    try:
      return int(json.loads(manifest.read_text())['process_count'])
    except (ValueError, KeyError):
      continue
  return None


def verify(folder: epath.PathLike, process_index: int = 0, process_count: int = 1) -> list[str]:
  """What is wrong with `folder`'s files against its checksum manifests ([]: nothing). Checks
  manifests i with i % process_count == process_index, so several processes share the reading.
  Files without a manifest are read unverified, with a warning."""
  folder = epath.Path(folder)
  expected = _manifest_count(folder)
  if expected is None:
    logging.warning('%s has no checksums (saved before they existed): read unverified.', folder)
    return []
  problems = []
  for index in range(process_index, expected, process_count):
    manifest = folder / MANIFEST.format(index)
    if not manifest.exists():
      logging.warning('%s has no %s (the job stopped before writing it): the files of process '
                      '%d are read unverified.', folder, manifest.name, index)
      continue
    try:
      files = json.loads(manifest.read_text())['files']
    except (ValueError, KeyError) as e:
      problems.append(f'{manifest.name} is unreadable ({e!r})')
      continue
    for name, stored in files.items():
      path = folder / name
      if not path.exists():
        problems.append(f'{name} is missing')
      elif path.stat().length != stored['bytes']:
        problems.append(f'{name} has {path.stat().length} bytes, {manifest.name} says '
                        f'{stored["bytes"]}')
      elif _sha256(path) != stored['sha256']:
        problems.append(f'{name} does not match its checksum in {manifest.name}')
  return problems


def _describe(step: int, folder: epath.Path, problems: list[str]) -> str:
  shown = problems[:5] + ([f'and {len(problems) - 5} more'] if len(problems) > 5 else [])
  return f'checkpoint {step} ({folder}): ' + '; '.join(shown)


def check_intact(folder: epath.PathLike, where: str, advice: str = ''):
  """Raises CorruptCheckpoint naming the files of `folder` (`where`, for the message) that fail
  their checksums, then `advice`; nothing is renamed."""
  problems = verify(folder)
  if problems:
    raise CorruptCheckpoint(f'{where} failed verification: ' + '; '.join(problems) + advice)


def _pooled(problems: list[str]) -> list[str]:
  """The problems every process found, on every process (their union, in process order)."""
  if jax.process_count() == 1:
    return problems
  text = '\n'.join(problems).encode()[:_MESSAGE_BYTES]
  local = np.zeros(_MESSAGE_BYTES, np.uint8)
  local[:len(text)] = np.frombuffer(text, np.uint8)
  pooled = multihost_utils.process_allgather(local)
  return [line for row in np.asarray(pooled)
          for line in bytes(row).rstrip(b'\0').decode(errors='replace').splitlines()]


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


EXECUTION_KEYS = ('model.attention', 'model.attention_block', 'model.vision.scan_layers')


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
    # Hashes committed steps in the background, one at a time.
    self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='checksums')
    self._manifests: list[concurrent.futures.Future] = []

  def latest_intact_step(self) -> int | None:
    """The newest step whose files match their checksums (None: no checkpoint yet). Newer steps
    that fail are reported and set aside as `{step}.corrupt-{time}`; when none verifies,
    raises CorruptCheckpoint naming what failed for each step, and renames nothing."""
    failed = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      problems = self._problems(step)
      if not problems:
        self._set_aside(failed, step)
        return step
      failed[step] = problems
    if failed:
      raise CorruptCheckpoint(
          f'No checkpoint in {self.directory} verifies (nothing was renamed or deleted):\n  ' +
          '\n  '.join(_describe(s, self.directory / str(s), p) for s, p in failed.items()))
    return None

  def _problems(self, step: int) -> list[str]:
    """What is wrong with `step`, the same list on every process (each checks its share)."""
    return _pooled(verify(self.directory / str(step), jax.process_index(), jax.process_count()))

  def _set_aside(self, failed: dict[int, list[str]], resume_step: int):
    """Renames the failed steps' folders to `{step}.corrupt-{time}` (process 0; the others wait)."""
    if not failed:
      return
    stamp = time.strftime('%Y%m%dT%H%M%S')
    for step, problems in failed.items():
      target = self.directory / f'{step}.corrupt-{stamp}'
      logging.warning('%s. Set aside as %s; resuming from checkpoint %d.',
                      _describe(step, self.directory / str(step), problems), target, resume_step)
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('lavi_checkpoints_set_aside')
    self.manager.reload()

  def save(self, step: int, state: TrainState, data_iterator, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a checkpoint is being written. Its
    checksums follow once Orbax has committed it."""
    saving = self.manager.save(
        step, force=force, custom_metadata={_MANIFEST_COUNT: jax.process_count()},
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_dict(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort()))))
    if saving:
      self._manifests.append(self._hasher.submit(self._write_manifest, step))
    return saving

  def _write_manifest(self, step: int):
    """This process's checksum manifest of `step`, once Orbax has committed the step."""
    self.manager.wait_until_finished()
    folder = self.directory / str(step)
    try:
      write_manifest(folder, jax.process_index(), jax.process_count())
    except OSError as e:  # e.g. removed meanwhile by keep=N
      if folder.exists():
        logging.error('Checkpoint %d has no checksums (it will be restored unverified): %s',
                      step, e)

  def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    """Restores the state onto `abstract_state`'s shardings and the iterator in place."""
    stored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    check_model_config(stored['config']['model'], self.config.model,
                       f'checkpoint {self.directory / str(step)}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_dict(abstract_state)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return TrainState(**restored['state'])

  def wait(self):
    """Until every save started is committed and has its checksums."""
    self.manager.wait_until_finished()
    for manifest in self._manifests:
      manifest.result()
    self._manifests = []

  def close(self):
    self.wait()
    self._hasher.shutdown()
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
  others = [s for s in manager.all_steps() if s != step]
  check_intact(directory / str(step), f'checkpoint {step} ({directory / str(step)})',
               f'. Other checkpoints: {others} (choose one with a step)' if others else '')
  stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  return lavi_config.from_json(stored['config']), directory / str(step) / 'state'


def load_params(workdir: str, step: int | None = None,
                abstract_params=None) -> tuple[ml_collections.ConfigDict, Any]:
  """(run config, parameters) of checkpoint `step` (default: the latest) of a training workdir,
  without the optimizer or data state. A checkpoint taken in a LoRA stage gives the weights
  with its adapters merged in (lavi_jax.train.lora.merge).

  `abstract_params`: ShapeDtypeStructs with shardings to restore onto (default: the stored
  model's shapes on the default device).
  """
  config, state = find_checkpoint(workdir, step)
  return config, read_params(config, state, abstract_params)


def read_params(config: ml_collections.ConfigDict, state: epath.Path, abstract_params=None):
  """The parameters in the train-state folder `state` that `find_checkpoint` gave with `config`
  (adapters merged, `abstract_params` as for `load_params`); no second verification."""
  if abstract_params is None:
    abstract_params = models.abstract_params(config.model)
  spec = lora_stage(config, int(state.parent.name))
  if spec is not None:
    abstract_params = lora_lib.abstract(abstract_params, spec)
  item = {'params': abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      state,
      args=ocp.args.PyTreeRestore(item=item,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True))
  if spec is not None:
    return lora_lib.merge(restored['params'], spec)
  return restored['params']


def lora_stage(config: ml_collections.ConfigDict, step: int) -> lora_lib.Lora | None:
  """The LoRA settings of the stage a checkpoint at `step` was taken in (None without LoRA)."""
  stage = opt_lib.stage_at(config.train, max(step - 1, 0)) or opt_lib.stages(config.train)[-1]
  return lora_lib.of_stage(stage.config)


def _as_dict(state: TrainState) -> dict[str, Any]:
  return dict(step=state.step, params=state.params, opt_state=state.opt_state)

