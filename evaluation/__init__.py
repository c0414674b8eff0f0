"""Evaluation: device-side accumulators, run metrics with their definitions, cost meters and report writers.

Knows only predictions, labels and segment metadata; nothing here imports streams or strategies.
Modules: ``online`` (accumulators), ``calibration`` (ECE), ``matrix`` (accuracy matrix, forgetting),
``metrics`` (run metrics + DEFINITIONS), ``cost``, ``recorder`` (run folder), ``report`` (tables, plots),
``html`` (self-contained pages), ``compare`` (several runs, seeds grouped).
"""
from .calibration import expected_calibration_error
from .compare import RunData, find_runs, load_run, write_comparison_report
from .cost import CostMeter, RunEstimate
from .matrix import AccuracyMatrix, accuracy_matrix
from .metrics import DEFINITIONS, definitions_for, run_metrics
from .online import SegmentAccumulator, SegmentRecord
from .recorder import Recorder
from .report import (accuracy_figure, display_table, domain_error_figure, error_table, format_table, matrix_figure,
                     metrics_table, plot_accuracy, save_figure)

__all__ = ["CostMeter", "RunEstimate", "DEFINITIONS", "definitions_for", "run_metrics", "SegmentAccumulator",
           "SegmentRecord", "Recorder", "error_table", "display_table", "metrics_table", "format_table",
           "plot_accuracy", "accuracy_figure", "matrix_figure", "domain_error_figure", "save_figure",
           "expected_calibration_error", "AccuracyMatrix", "accuracy_matrix", "RunData", "find_runs", "load_run",
           "write_comparison_report"]
