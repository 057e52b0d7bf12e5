"""Search: encode a query, search an index, filter and join metadata, rerank; CBVS-20K evaluation."""

from vsearch.query.rerank import Weights
from vsearch.query.search import Hit, QueryConfig, QueryTextError, Result, Searcher, search

__all__ = ["Hit", "QueryConfig", "QueryTextError", "Result", "Searcher", "Weights", "search"]
