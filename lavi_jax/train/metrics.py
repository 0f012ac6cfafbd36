"""Training metrics: a JSONL log, TensorBoard scalars and a PNG of the curves.

`{workdir}/metrics.jsonl` gets one JSON object per log interval and is only ever added to, so
a resumed run continues the same file. Only process 0 writes. The workdir may be a URL
(`gs://...`): object stores cannot append, so there each write rewrites the whole (small) file,
and TensorBoard event files go through `etils.epath` too.
"""

from __future__ import annotations

import io
import json
import math

import jax
from etils import epath

from lavi_jax.paths import is_url


class _EpathEventFile:
  """A TensorBoard event file on an object store: the whole file is rewritten at each flush."""

  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes):
    self.buffer.write(data)

  def flush(self):
    self.path.write_bytes(self.buffer.getvalue())

  def close(self):
    self.flush()


class _EpathEventFiles:
  """tensorboardX writer factory for URLs, in place of its own (which needs other packages)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str):
    del path  # object stores have no folders to create


def _tensorboard(logdir: epath.Path):
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=import-outside-toplevel
  for scheme in ('gs', 's3', 'az'):
    record_writer.register_writer_factory(scheme, _EpathEventFiles())
  return SummaryWriter(str(logdir))


class MetricsWriter:
  """Adds metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.tensorboard = None
    self._lines = None  # object stores: the file's content, rewritten whole at each write
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self.tensorboard = _tensorboard(epath.Path(workdir) / 'tensorboard')
      if is_url(workdir):
        self._lines = self.path.read_text() if self.path.exists() else ''

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    line = json.dumps({'step': step, **metrics}) + '\n'
    if self._lines is None:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._lines += line
      self.path.write_text(self._lines)
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
  # A bare Figure: no pyplot, so no GUI backend is chosen (or changed, in a notebook).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  steps = [r['step'] for r in records]
  fig = Figure(figsize=(10, 3.5))
  ax_loss, ax_acc = fig.subplots(1, 2)
  ax_loss.plot(steps, [r['loss'] for r in records])
  ax_loss.set(xlabel='step', ylabel='loss', title='training loss', yscale='log')
  ax_acc.plot(steps, [r['accuracy'] for r in records])
  ax_acc.set(xlabel='step', ylabel='token accuracy', title='answer-token accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = epath.Path(workdir) / out_name
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  return str(path)
