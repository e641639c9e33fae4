"""stitchalloc: a GPU memory allocator for long-context LLM training.

This package holds the Python side of the project. Importing it never imports torch; the
trace tools (stitchalloc.snapshot, ``python -m stitchalloc.convert``) work without it.
"""

__version__ = "0.1.0"
