"""The evaluator's numbers against hand counts and against Avalanche's own metric classes on the same predictions."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from ctta.evaluation import SegmentAccumulator, error_table, run_metrics


def _logits_for(pred: torch.Tensor, classes: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, classes).float() * 4


def test_segment_accumulator_hand_count():
    acc = SegmentAccumulator()
    acc.update(_logits_for(torch.tensor([0, 1, 2, 3])), torch.tensor([0, 1, 0, 0]))  # 2 of 4
    acc.update(_logits_for(torch.tensor([4, 4])), torch.tensor([4, 1]))  # 1 of 2
    rec = acc.finish()
    assert rec.step_sizes.tolist() == [4, 2] and rec.step_correct.tolist() == [2, 1]
    assert rec.accuracy == pytest.approx(3 / 6)


def test_accuracy_agrees_with_avalanche():
    avalanche_metrics = pytest.importorskip("avalanche.evaluation.metrics")
    g = torch.Generator().manual_seed(0)
    acc, ref = SegmentAccumulator(), avalanche_metrics.Accuracy()
    for _ in range(7):
        logits = torch.randn(33, 10, generator=g)
        labels = torch.randint(0, 10, (33,), generator=g)
        acc.update(logits, labels)
        ref.update(logits.argmax(1), labels)  # Avalanche's stream accuracy: correct / seen, over all batches
    assert acc.finish().accuracy == pytest.approx(ref.result(), abs=1e-12)


def test_run_metrics_and_table():
    seg = pd.DataFrame([
        {"segment": "clean@start", "role": "probe", "accuracy": 0.9, "error": 0.1},
        {"segment": "a", "role": "domain", "accuracy": 0.6, "error": 0.4},
        {"segment": "b", "role": "domain", "accuracy": 0.8, "error": 0.2},
        {"segment": "clean@end", "role": "probe", "accuracy": 0.85, "error": 0.15},
    ])
    m = run_metrics(seg)
    assert m["domain_error"] == {"a": 0.4, "b": 0.2} and m["mean_error"] == pytest.approx(0.3)
    assert m["source_forgetting"] == pytest.approx(0.05)
    table = error_table({"x": m})
    assert table.loc["x", "a"] == pytest.approx(40) and table.loc["x", "mean"] == pytest.approx(30)


def test_group_accuracy_agrees_with_avalanche_per_experience():
    avalanche_metrics = pytest.importorskip("avalanche.evaluation.metrics")
    g = torch.Generator().manual_seed(1)
    acc, refs = SegmentAccumulator(), [avalanche_metrics.Accuracy() for _ in range(3)]
    for _ in range(5):
        logits = torch.randn(20, 10, generator=g)
        labels = torch.randint(0, 10, (20,), generator=g)
        groups = torch.randint(0, 3, (20,), generator=g)
        acc.update(logits, labels, groups)
        for k, ref in enumerate(refs):  # one Avalanche Accuracy per experience (group)
            sel = groups == k
            ref.update(logits[sel].argmax(1), labels[sel])
    rows = acc.finish().group_rows(["a", "b", "c"])
    assert [r["accuracy"] for r in rows] == pytest.approx([ref.result() for ref in refs], abs=1e-12)
