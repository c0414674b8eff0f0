"""Evaluation: device-side accumulators, run metrics with their definitions, cost meters and report writers.

Knows only predictions, labels and step metadata; nothing here imports streams or strategies.
"""
from .cost import CostMeter
from .metrics import DEFINITIONS, run_metrics
from .online import SegmentAccumulator, SegmentRecord
from .recorder import Recorder
from .report import error_table, format_table, plot_accuracy

__all__ = ["CostMeter", "DEFINITIONS", "run_metrics", "SegmentAccumulator", "SegmentRecord", "Recorder",
           "error_table", "format_table", "plot_accuracy"]
