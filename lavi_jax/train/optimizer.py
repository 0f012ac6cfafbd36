"""Training stages, parameter freezing and the optimizer.

Parameters are addressed by their path, e.g. 'llm/layers/layer_0/self_attn/q_proj/kernel'. A
stage's `trainable` regex splits the tree into a trainable and a frozen part (flat dicts keyed by
path); only the trainable part is differentiated and has optimizer state.
"""

from __future__ import annotations

import dataclasses
import re

import flax.traverse_util
import ml_collections
import optax

SEP = '/'


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: `steps` optimizer steps starting at global step `start`."""
  name: str
  index: int
  start: int
  config: ml_collections.ConfigDict

  @property
  def end(self) -> int:
    return self.start + self.config.steps


def stages(train: ml_collections.ConfigDict) -> list[Stage]:
  """The configured stages in order, with their global start steps."""
  out, start = [], 0
  for index, name in enumerate(train.stage_order):
    if name not in train.stages:
      raise ValueError(f'config.train.stage_order names {name!r}, but config.train.stages has '
                       f'only {sorted(train.stages)}')
    stage_config = train.stages[name]
    if stage_config.steps <= 0:
      raise ValueError(f'config.train.stages.{name}.steps must be positive')
    out.append(Stage(name, index, start, stage_config))
    start += stage_config.steps
  return out


def stage_at(train: ml_collections.ConfigDict, step: int) -> Stage | None:
  """The stage that global step `step` belongs to (None once all stages are done)."""
  return next((s for s in stages(train) if s.start <= step < s.end), None)


def flatten(params) -> dict[str, object]:
  return flax.traverse_util.flatten_dict(params, sep=SEP)


def unflatten(flat: dict[str, object]):
  return flax.traverse_util.unflatten_dict(flat, sep=SEP)


def split(params, trainable: str) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts of `params` by the regex `trainable` (re.search)."""
  pattern = re.compile(trainable)
  flat = flatten(params)
  train = {k: v for k, v in flat.items() if pattern.search(k)}
  if not train:
    raise ValueError(f'trainable pattern {trainable!r} matches no parameter; paths look like '
                     f'{next(iter(flat))!r}')
  return train, {k: v for k, v in flat.items() if k not in train}


def merge(trainable: dict, frozen: dict):
  """Inverse of `split`: the nested parameter tree."""
  return unflatten({**frozen, **trainable})


def _lr_scales(spec: str) -> list[tuple[re.Pattern, float]]:
  """'vit=0.1,projector=2' -> [(re('vit'), 0.1), (re('projector'), 2.0)]."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    pattern, _, scale = item.rpartition('=')
    if not pattern:
      raise ValueError(f'lr_scale entry {item!r} is not REGEX=SCALE')
    out.append((re.compile(pattern), float(scale)))
  return out


def learning_rate_schedule(stage: Stage, train: ml_collections.ConfigDict, scale: float = 1.0):
  """Linear warmup then cosine decay over the stage (counts the stage's own steps)."""
  peak = stage.config.learning_rate * scale
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, min(stage.config.warmup_steps, stage.config.steps - 1), stage.config.steps,
      peak * train.end_lr_fraction)


# Weight decay by the parameter's name (the last part of its path), so scanned layers (a leading
# stacked 'layers' axis) decay exactly what unscanned ones do. Names ending in these decay:
# dense and conv kernels (incl. the ConvMixer's depthwise_kernel) and every embedding table
# (tokens, SigLIP's position_embedding, the crop/frame-index embedding), as in Hugging Face's
# Trainer. Norm scales, biases (incl. depthwise_bias) and the ViLN tanh gates do not.
DECAYED = ('kernel', 'embedding')
NOT_DECAYED = ('scale', 'bias', 'gate')


def decays(path: str) -> bool:
  """Whether AdamW's weight decay applies to the parameter at `path` (see DECAYED)."""
  name = path.rpartition(SEP)[2]
  if name.endswith(DECAYED):
    return True
  if name.endswith(NOT_DECAYED):
    return False
  raise ValueError(f'no weight-decay rule for parameter {path!r}: its name should end in one of '
                   f'{DECAYED} (decayed) or {NOT_DECAYED} (not decayed)')


def make_optimizer(stage: Stage, train: ml_collections.ConfigDict,
                   trainable: dict) -> optax.GradientTransformation:
  """AdamW over a flat trainable dict, with per-group learning rates and global-norm clipping.

  Weight decay (decoupled, as AdamW) applies to kernels and embeddings only (`decays`).
  """
  scales = _lr_scales(stage.config.lr_scale)

  def label(path: str) -> str:
    return next((str(i) for i, (p, _) in enumerate(scales) if p.search(path)), 'base')

  rates = {'base': optax.scale_by_learning_rate(learning_rate_schedule(stage, train))}
  rates.update({str(i): optax.scale_by_learning_rate(learning_rate_schedule(stage, train, s))
                for i, (_, s) in enumerate(scales)})
  return optax.chain(
      optax.clip_by_global_norm(train.clip_norm) if train.clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
      optax.add_decayed_weights(train.weight_decay, mask={k: decays(k) for k in trainable}),
      optax.multi_transform(rates, {path: label(path) for path in trainable}),
  )
