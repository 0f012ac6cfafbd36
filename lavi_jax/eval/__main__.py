"""Evaluates a LaVi checkpoint on benchmarks, with lmms-eval 0.7.3's prompts and scoring.

    python -m lavi_jax.eval --checkpoint DIR --tasks pope,mme,mmbench_en_dev --data-dir DATA

DIR is a `convert.from_hf` output or a training workdir; DATA holds the dataset exports
(README, "Evaluation"); each may be local or a URL (gs://...). Writes results.json and
samples.jsonl (lmms-eval's layout) to --output-dir and prints each task's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from etils import epath

from lavi_jax.data.errors import DataError
from lavi_jax.eval import runner, scoring, tasks
from lavi_jax.inference import serving
from lavi_jax.inference.generator import Generator


def reasoning_tags(value: str) -> list[list[str]] | None:
  """--reasoning-tags: see `scoring.parse_reasoning_tags`."""
  try:
    return scoring.parse_reasoning_tags(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lavi_jax.eval',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='convert.from_hf output folder or training workdir')
  parser.add_argument('--tasks', required=True, help='comma-separated lmms-eval task names; '
                      f'known: {", ".join(list(tasks.TASKS) + list(tasks.GROUPS))}')
  parser.add_argument('--data-dir', required=True, help='folder of the dataset exports')
  parser.add_argument('--output-dir', help='default: CHECKPOINT/eval')
  parser.add_argument('--limit', type=int, default=0, help='first N records per task (0: all)')
  parser.add_argument('--batch-size', type=int, default=8, help='requests decoded together')
  parser.add_argument('--max-len', type=int, default=4096,
                      help='cache slots per request: prompt and answer together')
  parser.add_argument('--max-new-tokens', type=int, default=0,
                      help='cap on every task\'s generation limit (0: the tasks\' own)')
  parser.add_argument('--num-frames', type=int, default=0,
                      help='frames sampled uniformly per video (default: the run\'s, else 8)')
  parser.add_argument('--tokenizer', help='tokenizer.json / .model / folder (default: the '
                      'training run\'s, else the one in the checkpoint folder)')
  parser.add_argument('--chat-template', help='chatml or vicuna_v1')
  parser.add_argument('--reasoning-tags', '--reasoning_tags', type=reasoning_tags,
                      default='default',
                      help='JSON list of [start, end] tag pairs whose blocks are removed from '
                      'answers before scoring, "none" to score answers as they are, or '
                      f'"default": {json.dumps(scoring.REASONING_TAGS)} (lmms-eval\'s '
                      '--reasoning_tags and its default)')
  serving.add_flags(parser)
  args = parser.parse_args(argv)
  try:
    selected = tasks.resolve(args.tasks)
  except ValueError as e:
    parser.error(str(e))
  try:
    generator = Generator.load(args.checkpoint, tokenizer=args.tokenizer,
                               chat_template=args.chat_template, max_len=args.max_len,
                               batch_size=args.batch_size, num_frames=args.num_frames,
                               mesh=args.mesh, dtype=args.dtype)
  except ValueError as e:  # a mesh that does not suit the devices or the model
    parser.error(str(e))
  output_dir = epath.Path(args.output_dir or epath.Path(args.checkpoint) / 'eval')
  output_dir.mkdir(parents=True, exist_ok=True)
  try:
    with (output_dir / 'samples.jsonl').open('w') as samples:
      outputs = runner.evaluate(generator, selected, args.data_dir, args.limit,
                                args.max_new_tokens, samples, args.reasoning_tags)
  except (DataError, FileNotFoundError) as e:
    print(f'error: {e} (answers so far: {output_dir}/samples.jsonl)', file=sys.stderr)
    return 1
  config = dict(model='lavi_jax', model_args=f'checkpoint={args.checkpoint}',
                batch_size=args.batch_size, limit=args.limit or None,
                max_new_tokens=args.max_new_tokens or None,
                num_frames=generator.spec.num_frames, chat_template=generator.template.name,
                reasoning_tags=args.reasoning_tags)
  results = runner.write_results(output_dir, outputs, config)
  print(json.dumps(results['results'], indent=2))
  print(f'Wrote {output_dir}/results.json and samples.jsonl')
  return 0


if __name__ == '__main__':
  sys.exit(main())
