"""Fixes: patches for ops that Keras, TensorFlow or LiteRT lack or get wrong.

Each module's docstring names the limitation (and the version it was seen in) so the fix can be
deleted once the limitation is gone.
"""
