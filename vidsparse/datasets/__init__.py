"""Synthetic data sets for training and evaluating the demo model."""

from vidsparse.datasets.shapes import QUESTION_TYPES, make_shapes

__all__ = ["QUESTION_TYPES", "make_shapes"]
