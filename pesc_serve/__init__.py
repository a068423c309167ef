"""pesc-serve: an inference engine for sparse adapter-MoE (PESC) language models."""

__version__ = "0.1.0"
