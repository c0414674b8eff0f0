"""Metrics against hand-computed matrices, the three forgetting definitions, ECE, confusion, and the engine's
per-group accounting (mixed domains, accuracy matrix from eval segments)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import ctta
from ctta import strategies
from ctta.evaluation import SegmentAccumulator, accuracy_matrix, expected_calibration_error, run_metrics
from ctta.evaluation.matrix import (average_anytime_accuracy, average_incremental_accuracy, backward_transfer,
                                    forgetting_avalanche, forgetting_max, last_accuracy)
from ctta.streams import Segment, Stream

from conftest import make_tiny

# correct counts out of 20 per (after session i, evaluated on session j); session 0 improves after session 1,
# so Avalanche's forgetting (vs right after learning) and Chaudhry's (vs the best) differ for s0
CORRECT = [[18, 0, 0], [19, 16, 0], [14, 8, 12]]
SESSIONS = ["s0", "s1", "s2"]


def _tables(extra_eval: bool = False):
    seg_rows, group_rows, idx = [], [], 0
    for i, s in enumerate(SESSIONS):
        seg_rows.append({"segment_index": idx, "segment": s, "kind": "train", "role": "session", "n": 20,
                         "accuracy": 0.5, "error": 0.5})
        idx += 1
        evals = [CORRECT[i]] if not (extra_eval and i == 1) else [[10, 10, 0], CORRECT[i]]
        for counts in evals:
            seg_rows.append({"segment_index": idx, "segment": f"eval@{s}", "kind": "eval", "role": "probe",
                             "n": 60, "accuracy": sum(counts) / 60, "error": 1 - sum(counts) / 60})
            for j, c in enumerate(counts):
                group_rows.append({"segment_index": idx, "segment": f"eval@{s}", "kind": "eval", "role": "probe",
                                   "after": s, "group": SESSIONS[j], "n": 20, "correct": c, "accuracy": c / 20,
                                   "error": 1 - c / 20})
            idx += 1
    return pd.DataFrame(seg_rows), pd.DataFrame(group_rows)


def test_matrix_and_the_three_forgetting_definitions_by_hand():
    segs, groups = _tables()
    m = accuracy_matrix(groups, segs)
    assert m.rows == SESSIONS and m.columns == SESSIONS
    np.testing.assert_allclose(m.R, np.array(CORRECT) / 20)
    fa, fm = forgetting_avalanche(m), forgetting_max(m)
    assert fa == pytest.approx({"s0": 0.90 - 0.70, "s1": 0.80 - 0.40})  # right after learning - final
    assert fm == pytest.approx({"s0": 0.95 - 0.70, "s1": 0.80 - 0.40})  # best before the end - final
    assert backward_transfer(m) == pytest.approx(-(0.2 + 0.4) / 2)
    assert average_incremental_accuracy(m) == pytest.approx((18 / 20 + 35 / 40 + 34 / 60) / 3)
    assert last_accuracy(m) == pytest.approx(34 / 60)
    summary = run_metrics(segs, groups)
    assert summary["forgetting_avalanche"] == pytest.approx(0.3)
    assert summary["forgetting_max"] == pytest.approx(0.325)
    assert summary["backward_transfer"] == pytest.approx(-0.3)
    assert summary["average_anytime_accuracy"] == pytest.approx(summary["average_incremental_accuracy"])


def test_last_eval_per_row_and_anytime_accuracy():
    segs, groups = _tables(extra_eval=True)  # an earlier eval after s1 ([10, 10] on s0, s1) is not R's row
    m = accuracy_matrix(groups, segs)
    np.testing.assert_allclose(m.R, np.array(CORRECT) / 20)
    aaa = average_anytime_accuracy(groups, segs)
    assert aaa == pytest.approx((18 / 20 + 20 / 40 + 35 / 40 + 34 / 60) / 4)


def test_forgetting_agrees_with_avalanche():
    fb = pytest.importorskip("avalanche.evaluation.metrics.forgetting_bwt")
    segs, groups = _tables()
    m = accuracy_matrix(groups, segs)
    ref_f, ref_b = fb.Forgetting(), fb.BWT()
    for i in range(len(SESSIONS)):  # what Avalanche's plugin does in each eval phase after training session i
        for ref in (ref_f, ref_b):
            ref.reset_last()
            for j in range(len(SESSIONS)):
                ref.update(j, m.R[i, j], initial=(i == j))
    ours = forgetting_avalanche(m)
    assert ref_f.result() == pytest.approx({0: ours["s0"], 1: ours["s1"]})
    assert np.mean(list(ref_b.result().values())) == pytest.approx(backward_transfer(m))


def test_ece_by_hand_and_against_torchmetrics_definition():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.30])
    ok = np.array([1, 0, 1, 1, 0])
    # bins (14/15, 1]: conf .95 acc .5 -> |.5-.95|*2; (8/15, 9/15]: conf .55 acc 1 -> |1-.55|*2; (4/15,5/15]: .3*1
    expected = (2 * 0.45 + 2 * 0.45 + 0.30) / 5
    assert expected_calibration_error(conf, ok) == pytest.approx(expected)
    assert expected_calibration_error(np.ones(4), np.ones(4)) == pytest.approx(0.0)


def test_confusion_and_per_class_accuracy():
    acc = SegmentAccumulator()
    eye = torch.eye(3) * 5
    acc.update(eye[torch.tensor([0, 1, 1, 2])], torch.tensor([0, 1, 2, 2]))
    rec = acc.finish()
    assert rec.confusion(3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert rec.per_class_accuracy(4) == [1.0, 1.0, 0.5, None]


def _groups_stream():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g)
    y = torch.arange(32) % 4
    xs = {"d0": x, "d1": (x * 0.3).clamp(0, 1)}

    def seg(name, kind, data, groups=None, role="domain", meta=None):
        if groups is None:
            return Segment(name, kind, 32, 8, lambda dev: (data.to(dev), y.to(dev)), role=role, meta=meta or {})
        xx = torch.cat([xs[k] for k in groups])
        yy = y.repeat(len(groups))
        gg = torch.arange(len(groups)).repeat_interleave(32)
        return Segment(name, kind, len(yy), 8, lambda dev: (xx.to(dev), yy.to(dev), gg.to(dev)), role=role,
                       meta=meta or {}, groups=list(groups))

    segs = [seg("d0", "adapt", xs["d0"]), seg("eval@d0", "eval", None, ["d0", "d1"], "probe", {"after": "d0"}),
            seg("d1", "adapt", xs["d1"]), seg("eval@d1", "eval", None, ["d0", "d1"], "probe", {"after": "d1", "x": (1, 2)}),
            seg("mixed", "adapt", None, ["d0", "d1"])]
    return Stream("groups", segs, num_classes=4, spec={"name": "groups"})


def test_engine_reports_groups_and_the_accuracy_matrix(tmp_path):
    res = ctta.run(_groups_stream(), strategies.create("source", make_tiny()), device="cpu", out=tmp_path,
                   progress=False)
    s = json.loads((tmp_path / "summary.json").read_text())
    seg_acc = res.segments.set_index("segment")["accuracy"]
    groups = pd.read_csv(tmp_path / "groups.csv")
    assert set(groups["segment"]) == {"eval@d0", "eval@d1", "mixed"} and (groups["n"] == 32).all()
    # the source model does not change: every group's accuracy equals that domain's own segment
    for r in groups.itertuples():
        assert r.accuracy == pytest.approx(seg_acc[r.group])
    # the mixed domain segment is reported per group, like domains
    assert s["domain_error"]["mixed/d0"] == pytest.approx(1 - seg_acc["d0"])
    assert s["accuracy_matrix"]["rows"] == ["d0", "d1"] and s["accuracy_matrix"]["columns"] == ["d0", "d1"]
    assert s["forgetting_avalanche"] == pytest.approx(0) and s["backward_transfer"] == pytest.approx(0)
    segments = pd.read_csv(tmp_path / "segments.csv")
    row = segments.set_index("segment").loc["eval@d1"]
    assert row["after"] == "d1" and json.loads(row["meta"]) == {"after": "d1", "x": [1, 2]}
    assert json.loads(row["groups"]) == ["d0", "d1"]
    details = [json.loads(line) for line in (tmp_path / "segment_details.jsonl").read_text().splitlines()]
    assert len(details) == 5 and np.array(details[0]["confusion"]).sum() == 32
    assert set(s["ece"]) == set(seg_acc.index) and "forgetting_max" in s["definitions"]
