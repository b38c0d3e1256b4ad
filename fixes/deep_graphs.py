"""Deep models: Keras builds a functional model's node map recursively, one Python frame per op.

Works around Keras 3.15 (``keras/src/ops/function.py:_build_map_helper`` recurses once per
operation on the longest path), which raises RecursionError under Python's default limit of
1000 frames for a chain of about 250 conv-BN-ReLU blocks. The limit is raised only while the
model is built. Delete when Keras walks the graph iteratively.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

FRAMES_PER_OP = 4  # _build_map_helper plus the tree.flatten calls it makes


@contextlib.contextmanager
def recursion_room(n_ops: int) -> Iterator[None]:
    """Room for ``n_ops`` nested Keras operations on top of the current limit."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, old + FRAMES_PER_OP * n_ops))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)
