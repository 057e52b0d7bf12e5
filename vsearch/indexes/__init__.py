"""Index builders and the on-disk index format."""

from vsearch.indexes.backends import INDEX_TYPES
from vsearch.indexes.store import BuildConfig, Index, build_index, load_index

__all__ = ["INDEX_TYPES", "BuildConfig", "Index", "build_index", "load_index"]
