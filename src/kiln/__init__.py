"""Kiln: a container-optimized, image-based Linux OS and the toolkit that builds it."""

__version__ = "0.1.0"
