"""Index builders and the on-disk index format."""

from vsearch.indexes.backends import INDEX_TYPES
from vsearch.indexes.index import Index, load_index
from vsearch.indexes.store import BuildConfig, append_index, build_index, delete_ids

__all__ = ["INDEX_TYPES", "BuildConfig", "Index", "append_index", "build_index", "delete_ids", "load_index"]
