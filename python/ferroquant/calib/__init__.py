"""Calibration: text -> token windows, and the layer-by-layer activation capture every
calibrated method shares."""

from .capture import InputStats, find_decoder_layers, first_layer_inputs, run_layers
from .data import calibration_ids, read_calibration_text

__all__ = [
    "InputStats",
    "calibration_ids",
    "find_decoder_layers",
    "first_layer_inputs",
    "read_calibration_text",
    "run_layers",
]
