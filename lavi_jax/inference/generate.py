"""Generates answers with a LaVi checkpoint.

    python -m lavi_jax.inference.generate --checkpoint DIR --image a.jpg --prompt "What is this?"
    python -m lavi_jax.inference.generate --checkpoint DIR --video v.mp4 --prompt "..."
    python -m lavi_jax.inference.generate --checkpoint DIR --requests in.jsonl --output out.jsonl

DIR is a `convert.from_hf` output or a training workdir (its latest checkpoint). With --prompt
the answer is streamed to stdout. With --requests, each line is a JSON object {"prompt",
"images" (a path or a list), "video", "id", and optionally "max_new_tokens", "temperature",
"top_k", "top_p", "seed"}, relative paths taken from the file's folder; each result is written
as one JSON line {"id", "text", "finish_reason", "token_ids"} or, for a request that failed,
{"id", "error"}, in input order. The exit status is 1 when any request failed (the others are
still answered), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from etils import epath

from lavi_jax.data.errors import DataError
from lavi_jax.inference import serving
from lavi_jax.inference.generator import Generator
from lavi_jax.inference.requests import Request, Result
from lavi_jax.inference.sampling import SamplingParams


def read_requests(path: str, defaults: SamplingParams) -> list[Request | Result]:
  """A JSONL file -> a Request per line, or an error Result naming the bad line."""
  out = []
  with epath.Path(path).open() as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        record = json.loads(line)
        request = Request.from_json(record, defaults, root=os.path.dirname(path))
        out.append(request if request.id else dataclasses.replace(request, id=where))
      except (json.JSONDecodeError, DataError) as e:
        out.append(Result(id=where, error=f'{where}: {e}'))
  return out


def result_json(result: Result) -> str:
  if result.error is not None:
    return json.dumps(dict(id=result.id, error=result.error))
  return json.dumps(dict(id=result.id, text=result.text, finish_reason=result.finish_reason,
                         token_ids=result.token_ids))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='convert.from_hf output folder or training workdir')
  parser.add_argument('--prompt', help='one prompt (its answer is streamed to stdout)')
  parser.add_argument('--image', action='append', default=[], help='image file (repeatable)')
  parser.add_argument('--video', help='video file')
  parser.add_argument('--requests', help='JSONL file of requests (instead of --prompt)')
  parser.add_argument('--output', help='JSONL results file for --requests (default: stdout)')
  parser.add_argument('--batch-size', type=int, default=8, help='requests decoded together')
  parser.add_argument('--max-len', type=int, default=4096,
                      help='cache slots per request: prompt and answer together')
  parser.add_argument('--tokenizer', help='tokenizer.json / .model / folder (default: the '
                      'training run\'s, else the one in the checkpoint folder)')
  parser.add_argument('--chat-template', help='chatml or vicuna_v1 (default: the run\'s, '
                      'else by LLM architecture)')
  for field in dataclasses.fields(SamplingParams):
    parser.add_argument('--' + field.name.replace('_', '-'), type=type(field.default),
                        default=field.default, help='see SamplingParams (default %(default)s)')
  serving.add_flags(parser)
  args = parser.parse_args(argv)
  if (args.prompt is None) == (args.requests is None):
    parser.error('give either --prompt or --requests')
  if args.requests and (args.image or args.video):
    parser.error('--image / --video go with --prompt; with --requests they are in the file')
  try:
    sampling = SamplingParams(**{f.name: getattr(args, f.name)
                                 for f in dataclasses.fields(SamplingParams)})
  except ValueError as e:
    parser.error(str(e))
  try:
    generator = Generator.load(args.checkpoint, tokenizer=args.tokenizer,
                               chat_template=args.chat_template, max_len=args.max_len,
                               batch_size=args.batch_size, sampling=sampling, mesh=args.mesh,
                               dtype=args.dtype)
  except ValueError as e:  # a mesh that does not suit the devices or the model
    parser.error(str(e))
  if args.prompt is not None:
    request = Request(args.prompt, images=tuple(args.image), video=args.video)
    [result] = generator.generate(
        [request], on_text=lambda _, text: print(text, end='', flush=True))
    if result.error is not None:
      print(result.error, file=sys.stderr)
      return 1
    print()
    return 0
  items = read_requests(args.requests, sampling)
  out = epath.Path(args.output).open('w') if args.output else sys.stdout
  failed = 0
  try:
    for start in range(0, len(items), args.batch_size):
      group = items[start:start + args.batch_size]
      answered = iter(generator.generate([r for r in group if isinstance(r, Request)]))
      for item in group:
        result = next(answered) if isinstance(item, Request) else item
        failed += result.error is not None
        print(result_json(result), file=out, flush=True)
  finally:
    if out is not sys.stdout:
      out.close()
  if failed:
    print(f'{failed} of {len(items)} requests failed', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
