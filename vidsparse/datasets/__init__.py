"""Synthetic data sets for training and evaluating the demo models (ShapesQA and ShapesQA-HD)."""

from vidsparse.datasets.shapes import QUESTION_TYPES, make_shapes
from vidsparse.datasets.shapes_hd import make_shapes_hd

__all__ = ["QUESTION_TYPES", "make_shapes", "make_shapes_hd"]
