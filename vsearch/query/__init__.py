"""Search: encode a query, search an index, join metadata."""

from vsearch.query.search import Hit, QueryConfig, search

__all__ = ["Hit", "QueryConfig", "search"]
