"""Training metrics: a JSONL log, TensorBoard scalars and a PNG of the curves.

`{workdir}/metrics.jsonl` gets one JSON object per log interval and is only ever appended to,
so a resumed run continues the same file. Only process 0 writes.
"""

from __future__ import annotations

import json
import math

import jax
from etils import epath


class MetricsWriter:
  """Appends metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.tensorboard = None
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tensorboard = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: str, out_name: str = 'curves.png') -> str | None:
  """Draws loss and token accuracy against step into `{workdir}/{out_name}`."""
  records = read_metrics(workdir)
  if not records or jax.process_index() != 0:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [r['step'] for r in records]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax_loss.plot(steps, [r['loss'] for r in records])
  ax_loss.set(xlabel='step', ylabel='loss', title='training loss', yscale='log')
  ax_acc.plot(steps, [r['accuracy'] for r in records])
  ax_acc.set(xlabel='step', ylabel='token accuracy', title='answer-token accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = epath.Path(workdir) / out_name
  fig.savefig(str(path), dpi=100)
  plt.close(fig)
  return str(path)
