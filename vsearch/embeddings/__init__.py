"""Datasets, encoders, the batch embed job and its shard writer."""

from vsearch.embeddings.encoders import Encoder, ImageEncoder, load_encoder, register_encoder

__all__ = ["Encoder", "ImageEncoder", "load_encoder", "register_encoder"]
