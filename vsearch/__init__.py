"""vsearch: vector search for short-video covers and clips.

Data flows one way: dataset -> encoder -> shards -> index -> query.
"""

__version__ = "0.1.0"
