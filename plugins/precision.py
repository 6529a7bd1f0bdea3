"""Precision plugins (entry-point group ``treadle.precision``)."""

from __future__ import annotations

from treadle.components import Precision


class FP32(Precision):
    """Full float32: no conversion, no autocast, no loss scaling."""

    name = "fp32"
