"""Merak: automated 3D parallelism for unmodified PyTorch and Hugging Face models."""

__version__ = "0.1.0"
