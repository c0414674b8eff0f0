"""The cost report's stored elements (``Strategy.stored_elements``) and per-run peak memory: hand-counted cases,
the memories counting what they hold, the run summary and the comparison table."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.evaluation.cost import CostMeter, peak_rss_mb
from ctta.strategies.common.replay import GreedyClassBalancedBuffer, GrowingStore, ReservoirBuffer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BACKBONE = sum(t.numel() for t in make_tiny(num_classes=4).state_dict().values())  # weights + BN statistics


def _stream():
    return two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6)


def test_an_untouched_backbone_stores_nothing_a_changed_one_counts_whole():
    s = strategies.create("finetune", make_tiny(num_classes=4))
    assert s.stored_elements() == 4  # only the seen-class mask: the backbone is as it started
    with torch.no_grad():
        s.model.fc.bias.add_(1.0)
    assert s.stored_elements() == 4 + 4  # the changed head (4 biases), not the unchanged rest


def test_memories_count_the_samples_they_hold_not_their_allocation():
    r = ReservoirBuffer(10)
    r.add(torch.rand(3, 3, 4, 4), torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0),
          logits=torch.rand(3, 5))
    assert r.stored_elements() == 3 * (48 + 1 + 1 + 5)  # images, labels, task ids, logits; 11 rows allocated
    g = GrowingStore()
    g.add(torch.rand(5, 3, 4, 4), torch.zeros(5, dtype=torch.long))
    assert g.stored_elements() == 5 * 49 and g.x.shape[0] == 64
    b = GreedyClassBalancedBuffer(4)
    b.add(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert b.stored_elements() == 2 * 49


def test_strategy_state_counts_prototypes_teachers_and_buffers():
    class Keeps(strategies.Strategy if hasattr(strategies, "Strategy") else ctta.strategies.base.Strategy):
        name = "keeps_test"

        def __init__(self, model):
            super().__init__(model)
            self.model.requires_grad_(False)
            self.register_buffer("prototypes", torch.zeros(4, 8))  # 32
            self.teacher = nn.Linear(8, 4)  # 36
            self.remember_initial_state()

    s = Keeps(make_tiny(num_classes=4))
    assert s.stored_elements() == 32 + 36


@pytest.mark.parametrize("name,hp,extra", [
    ("er", {"buffer_size": 8}, 8 * (192 + 2)),  # 8 images of 3 x 8 x 8, labels, task ids
    ("der", {"buffer_size": 8}, 8 * (192 + 2 + 4)),  # plus 4 stored logits each
    ("gdumb", {"buffer_size": 8, "epochs": 1}, 8 * (192 + 1)),
    ("lwf", {}, TINY_BACKBONE),  # the previous model's copy
])
def test_run_summary_and_report_show_the_costs(tmp_path, name, hp, extra):
    s = strategies.create(name, make_tiny(num_classes=4), **hp)
    res = ctta.run(_stream(), s, device="cpu", progress=False, out=tmp_path / name)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    # the backbone's tensors that training changed (weights, BN statistics; a conv bias before a BN gets no
    # gradient), plus the seen mask (and LwF's old-class mask), plus the memory
    start = make_tiny(num_classes=4).state_dict()
    changed = sum(v.numel() for k, v in s.model.state_dict().items() if not torch.equal(v, start[k]))
    assert changed >= TINY_BACKBONE - 8
    own = 4 + (4 if name == "lwf" else 0)
    assert summary["stored_elements"] == changed + own + extra == res.summary["stored_elements"]
    assert summary["trainable_parameters"] == sum(p.numel() for p in s.model.parameters())
    assert summary["peak_memory_mb"] > 0 and summary["memory_kind"].startswith("process_peak_rss")
    assert "stored_elements" in summary["definitions"]
    table = res.table()
    shown = lambda v: pytest.approx(v, abs=0.051)  # noqa: E731  (the table is displayed to one decimal)
    assert table.loc[name, "stored (k)"] == shown(summary["stored_elements"] / 1e3)
    assert table.loc[name, "trainable (k)"] == shown(summary["trainable_parameters"] / 1e3)
    assert table.loc[name, "peak MiB"] == shown(summary["peak_memory_mb"])


def test_comparison_report_has_the_cost_columns(tmp_path):
    from ctta.evaluation import find_runs, load_run, write_comparison_report

    for name, hp in (("er", {"buffer_size": 8}), ("finetune", {})):
        ctta.run(_stream(), strategies.create(name, make_tiny(num_classes=4), **hp), device="cpu", progress=False,
                 out=tmp_path / "runs" / name)
    files = write_comparison_report([load_run(r) for r in find_runs([tmp_path / "runs"])], tmp_path / "cmp")
    md = files["markdown"].read_text()
    assert "peak MiB" in md and "trainable (k)" in md and "stored (k)" in md


def test_cpu_peak_is_reset_per_run():
    if peak_rss_mb() is None:
        pytest.skip("no /proc/self/status VmHWM here")
    blob = torch.ones(64 * 2**20 // 4)  # 64 MiB resident
    del blob
    meter = CostMeter(torch.device("cpu"))
    assert meter.memory_kind() == "process_peak_rss"
    small = meter.peak_memory_mb()
    blob = torch.ones(64 * 2**20 // 4)
    assert meter.peak_memory_mb() >= small + 50  # the new allocation shows; the earlier one did not linger
    del blob


def test_trainable_parameters_are_the_most_any_segment_trained():
    """A method that trains in the first session only (and drops its optimizer) still reports what it trained."""
    s = strategies.create("finetune", make_tiny(num_classes=4))
    original, closed = s.close_session, []

    def first_session_only():
        original()
        closed.append(True)

    s.close_session = first_session_only
    trained = s.trainable_parameters
    s.trainable_parameters = lambda: [] if closed else trained()  # as if the optimizer went with session 0
    res = ctta.run(_stream(), s, device="cpu", progress=False)
    assert s.trainable_parameters() == []
    assert res.summary["trainable_parameters"] == sum(p.numel() for p in s.model.parameters())
