"""Runs benchmark tasks with a `Generator` and writes lmms-eval's output layout.

- `results.json`: {'results': {task: {'alias', 'METRIC,none', 'METRIC_stderr,none'}},
  'configs', 'versions', 'n-shot', 'higher_is_better', 'n-samples', 'config', 'date'}.
- `samples.jsonl` (lmms-eval: `{task}.jsonl` per task; here one file, each line naming its
  `task`): doc_id, doc (without images), target, arguments, resps (the answer stripped of
  surrounding whitespace, as lmms-eval's models return it), filtered_resps (the answer scored:
  without reasoning blocks, as lmms-eval's command line scores by default), and the per-sample
  values of each metric; written batch by batch, so an error keeps what is done.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from typing import Any, Iterable, Sequence, TextIO

from absl import logging
from etils import epath

from lavi_jax.data.errors import DataError
from lavi_jax.eval import datasets
from lavi_jax.eval.scoring import REASONING_TAGS, strip_reasoning_tags
from lavi_jax.eval.tasks import Task
from lavi_jax.inference.generator import Generator
from lavi_jax.inference.requests import Request
from lavi_jax.inference.sampling import SamplingParams

ReasoningTags = Sequence[Sequence[str]] | None


@dataclasses.dataclass
class TaskOutput:
  """One task's aggregated metrics and per-sample records."""
  task: Task
  metrics: dict[str, Any]
  samples: list[dict[str, Any]]
  n_total: int  # records in the whole data file (before a limit)
  max_new_tokens: int  # the generation limit used (the task's, or the cap)
  seconds: float


def _json_doc(doc: dict[str, Any]) -> dict[str, Any]:
  """The record without its images/videos (bytes), as lmms-eval logs docs."""
  keep = lambda v: not isinstance(v, (bytes, bytearray)) and not (
      isinstance(v, dict) and isinstance(v.get('bytes'), (bytes, bytearray)))
  return {k: v for k, v in doc.items()
          if keep(v) and not (isinstance(v, list) and v and not all(keep(x) for x in v))}


def _read(task: Task, path: epath.Path, limit: int) -> tuple[list[dict[str, Any]], int]:
  """The task's first `limit` records (0: all), fewer where the limit would split a group of
  records scored together (MME's question pairs), and the number of records in the file."""
  if not (limit and task.group):
    return datasets.read_records(path, limit)
  docs, total = datasets.read_records(path, limit + 1)
  groups = []
  for i, doc in enumerate(docs):
    with _naming(path, i):
      groups.append(task.group(doc))
  kept = limit
  while len(docs) > limit and kept and groups[kept - 1] == groups[limit]:
    kept -= 1
  if kept < limit:
    logging.warning('%s: a limit of %d splits the group of record %d; using the first %d '
                    'records.', task.name, limit, limit - 1, kept)
  return docs[:kept], total


def score(task: Task, doc: dict[str, Any], text: str,
          reasoning_tags: ReasoningTags = REASONING_TAGS) -> tuple[str, dict[str, Any]]:
  """The answer scored (the text without reasoning blocks, unless `reasoning_tags` is None)
  and the task's per-sample values for it."""
  answer = text if reasoning_tags is None else strip_reasoning_tags(text, reasoning_tags)
  return answer, task.process(doc, answer)


def run_task(generator: Generator, task: Task, data_dir: str | epath.PathLike, limit: int = 0,
             max_new_tokens: int = 0, samples_file: TextIO | None = None,
             reasoning_tags: ReasoningTags = REASONING_TAGS) -> TaskOutput:
  """Answers a task's records greedily, `generator.batch_size` at a time, and scores them.

  max_new_tokens: > 0 caps the task's generation limit (for quick runs). samples_file: gets
  each sample (a JSON line) as its batch completes. reasoning_tags: [start, end] tag pairs
  whose blocks are removed from answers before scoring (lmms-eval's --reasoning_tags); None
  scores answers as they are. Raises DataError naming the data file, record and field when a
  record cannot be used.
  """
  start = time.perf_counter()
  path = datasets.find_data_file(data_dir, task.data)
  docs, n_total = _read(task, path, limit)
  new_tokens = min(task.max_new_tokens, max_new_tokens) if max_new_tokens else \
      task.max_new_tokens
  sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  generation = dict(max_new_tokens=new_tokens, temperature=0, do_sample=False)
  samples, per_metric = [], {m: [] for m in task.metrics}
  for first in range(0, len(docs), generator.batch_size):
    requests = []
    for i, doc in enumerate(docs[first:first + generator.batch_size], first):
      with _naming(path, i):
        images, video = task.visual(doc, path.parent)
        requests.append(Request(task.prompt(doc), images=images, video=video,
                                id=f'{path} record {i}', sampling=sampling))
    for i, request, result in zip(range(first, len(docs)), requests,
                                  generator.generate(requests)):
      if result.error:
        raise DataError(result.error)
      text = result.text.strip()  # as lmms-eval's model wrappers
      with _naming(path, i):
        answer, scores = score(task, docs[i], text, reasoning_tags)
        target = task.target(docs[i])
      for metric, value in scores.items():
        per_metric[metric].append(value)
      sample = dict(doc_id=i, doc=_json_doc(docs[i]), target=target,
                    arguments={'gen_args_0': {'arg_0': request.prompt, 'arg_1': generation}},
                    resps=[[text]], filtered_resps=[answer], **scores)
      samples.append(sample)
      if samples_file is not None:
        samples_file.write(json.dumps(dict(task=task.name, **sample), default=str) + '\n')
    if samples_file is not None:
      samples_file.flush()
  metrics = {m: aggregate(per_metric[m]) for m, aggregate in task.metrics.items()
             if per_metric[m]}
  return TaskOutput(task, metrics, samples, n_total, new_tokens, time.perf_counter() - start)


class _naming:
  """Re-raises a missing field or a DataError as a DataError naming the file and record."""

  def __init__(self, path: epath.Path, index: int):
    self.where = f'{path} record {index}'

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if isinstance(error, KeyError):
      raise DataError(f'{self.where}: missing field {error}') from error
    if isinstance(error, DataError):
      raise DataError(f'{self.where}: {error}') from error
    return False


def evaluate(generator: Generator, tasks: Iterable[Task], data_dir: str | epath.PathLike,
             limit: int = 0, max_new_tokens: int = 0, samples_file: TextIO | None = None,
             reasoning_tags: ReasoningTags = REASONING_TAGS) -> list[TaskOutput]:
  """Runs the tasks in turn (see `run_task`)."""
  outputs = []
  for task in tasks:
    output = run_task(generator, task, data_dir, limit, max_new_tokens, samples_file,
                      reasoning_tags)
    logging.info('%s: %s (%d samples, %.0f s)', task.name, output.metrics,
                 len(output.samples), output.seconds)
    outputs.append(output)
  return outputs


def results_json(outputs: list[TaskOutput], config: dict[str, Any]) -> dict[str, Any]:
  """lmms-eval's results.json for the outputs; `config` holds the model and run arguments."""
  results, configs = {}, {}
  for out in outputs:
    t = out.task
    results[t.name] = {'alias': t.name}
    for metric, value in out.metrics.items():
      results[t.name][f'{metric},none'] = value
      results[t.name][f'{metric}_stderr,none'] = 'N/A'
    configs[t.name] = dict(task=t.name, data_file=t.data, output_type='generate_until',
                           generation_kwargs=dict(max_new_tokens=out.max_new_tokens,
                                                  temperature=0, do_sample=False),
                           metric_list=[dict(metric=m, higher_is_better=True)
                                        for m in t.metrics])
  return {
      'results': results,
      'configs': configs,
      'versions': {o.task.name: 0.0 for o in outputs},
      'n-shot': {o.task.name: 0 for o in outputs},
      'higher_is_better': {o.task.name: {m: True for m in o.task.metrics} for o in outputs},
      'n-samples': {o.task.name: {'original': o.n_total, 'effective': len(o.samples)}
                    for o in outputs},
      'config': config,
      'date': datetime.datetime.now().strftime('%Y%m%d_%H%M%S'),
  }


def write_results(output_dir: epath.Path, outputs: list[TaskOutput],
                  config: dict[str, Any]) -> dict[str, Any]:
  """Writes results.json to `output_dir`; returns the results."""
  results = results_json(outputs, config)
  (output_dir / 'results.json').write_text(json.dumps(results, indent=2, default=str))
  return results


def headline_metrics(outputs: list[TaskOutput]) -> dict[str, float]:
  """{'eval/{task}/{headline metric}': value}, for training logs."""
  return {f'eval/{o.task.name}/{o.task.headline}': float(o.metrics[o.task.headline])
          for o in outputs if o.task.headline in o.metrics}
