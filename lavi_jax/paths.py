"""Paths that may be URLs (`gs://...`, through `etils.epath`) rather than local files."""

from __future__ import annotations

from etils import epath


def is_url(path: str | epath.PathLike) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...) rather than a local disk."""
  return '://' in str(path)


def absolute(path: str | epath.PathLike) -> epath.Path:
  """`path` made absolute (Orbax wants absolute paths); URLs already are."""
  return epath.Path(path) if is_url(path) else epath.Path(path).resolve()
