"""The loop: step kinds, refusal of unsupported streams, outputs written as it goes, resume, determinism."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import ctta
from ctta import strategies
from ctta.errors import ConfigError, UnsupportedError
from ctta.streams import Stream, from_batches, tensor_segment

from conftest import interrupt_at, make_tiny


def _stream(n_domains: int = 3, n: int = 24, bs: int = 8, probes: bool = True) -> Stream:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 4
    segs = [tensor_segment("clean@start", "eval", x, y, bs, role="probe")] if probes else []
    for d in range(n_domains):
        segs.append(tensor_segment(f"d{d}", "adapt", (x * (0.5 + 0.2 * d)).clamp(0, 1), y, bs))
    if probes:
        segs.append(tensor_segment("clean@end", "eval", x, y, bs, role="probe"))
    return Stream(name="toy", segments=segs, num_classes=4, spec={"name": "toy", "n": n})


def test_run_writes_every_output(tmp_path):
    res = ctta.run(_stream(), strategies.create("tent", make_tiny()), device="cpu", out=tmp_path, progress=False,
                   config={"stream": {"name": "toy"}})
    for f in ("steps.csv", "segments.csv", "domains.csv", "summary.json", "config.yaml", "accuracy_over_time.png",
              "checkpoint.pt"):
        assert (tmp_path / f).is_file(), f
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert len(steps) == 5 * 3 and list(steps["step"]) == list(range(15))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["domain_error"]) == {"d0", "d1", "d2"}
    assert summary["mean_error"] == pytest.approx(sum(summary["domain_error"].values()) / 3)
    assert summary["source_forgetting"] == pytest.approx(summary["clean_accuracy_start"] - summary["clean_accuracy_end"])
    assert summary["trainable_parameters"] == 32  # two BN layers of 8 channels, weight + bias
    assert "definitions" in summary and "mean_error" in summary["definitions"]
    assert list(res.table().columns[:3]) == ["d0", "d1", "d2"]


def test_online_accuracy_matches_a_hand_count():
    stream = _stream(n_domains=1, probes=False)
    s = strategies.create("source", make_tiny())
    res = ctta.run(stream, s, device="cpu", progress=False)
    x, y = stream.segments[0].load(torch.device("cpu"))
    expected = (make_tiny()(x).argmax(1) == y).float().mean().item()
    assert res.summary["domain_error"]["d0"] == pytest.approx(1 - expected)


def test_eval_steps_change_no_state():
    s = strategies.create("tent", make_tiny(), lr=0.1)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    stream = Stream("probe", [tensor_segment("p", "eval", torch.rand(16, 3, 8, 8), torch.zeros(16), 8, role="probe")],
                    num_classes=4)
    ctta.run(stream, s, device="cpu", progress=False)
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())


def test_train_steps_go_through_the_same_loop():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = (torch.arange(64) % 2)
    x[:, 0] += y.view(-1, 1, 1).float()
    segs = [tensor_segment("before", "eval", x, y, 16, role="probe")]
    segs += [tensor_segment(f"epoch{i}", "train", x, y, 16, role="session") for i in range(15)]
    segs += [tensor_segment("after", "eval", x, y, 16, role="probe")]
    stream = Stream("supervised", segs, num_classes=2, setting="class_incremental")
    res = ctta.run(stream, strategies.create("finetune", make_tiny(num_classes=2), lr=0.05), device="cpu",
                   progress=False)
    acc = res.segments.set_index("segment")["accuracy"]
    assert acc["after"] > 0.9 and acc["after"] > acc["before"]


def test_unsupported_stream_is_refused_before_any_work():
    train_stream = Stream("cil", [tensor_segment("s0", "train", torch.rand(4, 3, 8, 8), torch.zeros(4), 2)],
                          num_classes=4, setting="class_incremental")
    with pytest.raises(UnsupportedError, match="strategy 'tent' cannot run stream 'cil'.*train"):
        ctta.run(train_stream, strategies.create("tent", make_tiny()), device="cpu", progress=False)
    with pytest.raises(UnsupportedError, match="finetune.*adapt"):
        ctta.run(_stream(), strategies.create("finetune", make_tiny()), device="cpu", progress=False)


def test_same_seed_same_predictions(tmp_path):
    runs = []
    for k in range(2):
        res = ctta.run(_stream(), strategies.create("cotta", make_tiny(), views=4, seed=5, ap=1.01), device="cpu",
                       out=tmp_path / str(k), progress=False)
        runs.append(res.steps["correct"].tolist())
    assert runs[0] == runs[1]


class _Interrupt(Exception):
    pass


def test_resume_continues_after_the_last_finished_segment(tmp_path):
    full = ctta.run(_stream(), strategies.create("cotta", make_tiny(), views=2, seed=1, ap=1.01), device="cpu",
                    out=tmp_path / "full", progress=False)
    s = interrupt_at(strategies.create("cotta", make_tiny(), views=2, seed=1, ap=1.01), 5)  # inside the second domain
    with pytest.raises(KeyboardInterrupt):
        ctta.run(_stream(), s, device="cpu", out=tmp_path / "cut", progress=False)
    assert len(pd.read_csv(tmp_path / "cut" / "segments.csv")) == 2  # clean@start and d0 were kept
    fresh = strategies.create("cotta", make_tiny(), views=2, seed=1, ap=1.01)
    resumed = ctta.run(_stream(), fresh, device="cpu", out=tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps["correct"].tolist() == full.steps["correct"].tolist()
    assert resumed.summary["domain_error"] == full.summary["domain_error"]


def test_resume_refuses_another_stream(tmp_path):
    ctta.run(_stream(), strategies.create("source", make_tiny()), device="cpu", out=tmp_path, progress=False)
    other = _stream(n=16)
    other.spec = {"name": "toy", "n": 16}
    with pytest.raises(ConfigError, match="cannot resume"):
        ctta.run(other, strategies.create("source", make_tiny()), device="cpu", out=tmp_path, resume=True,
                 progress=False)


def test_bad_device_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        ctta.run(_stream(), strategies.create("source", make_tiny()), device="gpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            ctta.run(_stream(), strategies.create("source", make_tiny()), device="cuda", progress=False)


def test_from_batches_custom_stream():
    batches = [(torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    stream = from_batches(batches, kind="adapt", num_classes=4)
    res = ctta.run(stream, strategies.create("bn", make_tiny()), device="cpu", progress=False)
    assert len(res.steps) == 3 and res.steps["n"].tolist() == [8, 8, 8]
