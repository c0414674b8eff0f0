"""Forgetting probes on test-time streams: held-out images of every domain seen so far after each domain, the
accuracy matrix, forward transfer for ``all``, and probes that never change a strategy's state."""
from __future__ import annotations

import copy

import pytest
import torch

import ctta
from ctta import strategies
from ctta.errors import ConfigError, CttaError
from ctta.streams.corruption_stream import corruption_stream
from ctta.streams.datasets import ImageSet

from conftest import make_tiny

CPU = torch.device("cpu")


def _indexed_set(n: int = 300) -> ImageSet:
    """Images whose first pixel encodes their index (so a segment tells which images it holds)."""
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) % 256
    x[:, 1, 0, 0] = torch.arange(n) // 256
    return ImageSet(x, torch.arange(n) % 5, [str(c) for c in range(5)])


def _indices(x: torch.Tensor) -> set:
    u8 = (x * 255).round().long()
    return set((u8[:, 0, 0, 0] + 256 * u8[:, 1, 0, 0]).tolist())


def _identity_files(clean: ImageSet):
    """Precomputed "-C files" equal to the clean images: the streams read them, so pixels keep their index."""
    return lambda c, s: ImageSet(clean.images.clone(), clean.labels.clone(), list(clean.classes), source="x.npy")


def test_seen_probes_follow_every_domain_on_held_out_images():
    clean = _indexed_set()
    s = corruption_stream("t", clean, "gaussian_noise,contrast,fog", batch_size=20, probes="seen", probe_samples=40,
                          files=_identity_files(clean))
    names = [seg.name for seg in s]
    assert names == ["clean@start", "gaussian_noise-5", "probes@gaussian_noise-5", "contrast-5",
                     "probes@contrast-5", "fog-5", "probes@fog-5", "clean@end"]
    probe = s.segments[-2]
    assert probe.groups == ["clean", "gaussian_noise-5", "contrast-5", "fog-5"]
    assert probe.meta["after"] == "fog-5" and probe.kind == "eval" and probe.role == "probe"
    held = _indices(s.segments[0].materialise(CPU)[0])
    assert len(held) == 40
    for seg in s:
        x, _, g = seg.materialise(CPU)
        if seg.role == "domain":
            assert not held & _indices(x)  # never adapted on
            assert seg.num_samples == 260  # the rest of the set
        elif seg.name.startswith("probes@"):
            for k in range(len(seg.groups)):
                assert _indices(x[g == k]) == held
    assert s.spec["probes"] == "seen" and s.spec["probe_samples"] == 40


def test_probe_images_and_noise_are_the_same_at_every_probe():
    s = ctta.streams.create("digits_c", corruptions="gaussian_noise,shot_noise", probes="seen", batch_size=32,
                            probe_samples=64)
    first = s.segments[2].materialise(CPU)
    last = s.segments[4].materialise(CPU)
    for k in (0, 1):  # clean and gaussian_noise-5 in both
        assert torch.equal(first[0][first[2] == k], last[0][last[2] == k])


def test_all_probes_give_forward_transfer_and_the_matrix_in_the_summary(tmp_path):
    s = ctta.streams.create("digits_c", corruptions="gaussian_noise,contrast,fog", probes="all", batch_size=32,
                            probe_samples=64, num_samples=200)
    assert s.segments[1].name == "probes@start" and len(s.segments[1].groups) == 4
    assert all(len(seg.groups) == 4 for seg in s if seg.name.startswith("probes@"))
    res = ctta.run(s, strategies.create("tent", make_tiny(num_classes=10)), device="cpu", progress=False,
                   out=tmp_path / "run")
    m = res.summary["accuracy_matrix"]
    assert m["rows"] == ["gaussian_noise-5", "contrast-5", "fog-5"]
    assert m["columns"] == ["gaussian_noise-5", "contrast-5", "fog-5", "clean"]
    assert all(v is not None for row in m["values"] for v in row)  # all: every domain in every row
    for key in ("forward_transfer", "backward_transfer", "forgetting_avalanche", "last_accuracy"):
        assert key in res.summary
    # probes stay out of the online error and the per-domain table
    assert set(res.summary["domain_error"]) == {"gaussian_noise-5", "contrast-5", "fog-5"}
    adapt = res.segments[res.segments["kind"] == "adapt"]
    assert res.summary["online_accuracy"] == pytest.approx(float((adapt["accuracy"] * adapt["n"]).sum()
                                                                 / adapt["n"].sum()))
    assert (tmp_path / "run" / "accuracy_matrix.png").is_file()


def test_source_has_no_forgetting_and_seen_probes_default_off():
    s = ctta.streams.create("digits_c", corruptions="gaussian_noise,contrast", probes="seen", batch_size=32,
                            probe_samples=64)
    res = ctta.run(s, strategies.create("source", make_tiny(num_classes=10)), device="cpu", progress=False)
    assert res.summary["forgetting_avalanche"] == 0.0 and res.summary["backward_transfer"] == 0.0
    plain = ctta.streams.create("digits_c", corruptions="gaussian_noise,contrast", batch_size=32)
    assert [seg.name for seg in plain] == ["clean@start", "gaussian_noise-5", "contrast-5", "clean@end"]
    none = ctta.streams.create("digits_c", corruptions="gaussian_noise", probes="none", batch_size=32)
    assert [seg.name for seg in none] == ["gaussian_noise-5"]


@pytest.mark.parametrize("bad,word", [({"probes": "some"}, "probes must be"), ({"probe_samples": 0}, "probe_samples"),
                                      ({"order": "mixed"}, "one round"), ({"order": "long_term"}, "one round")])
def test_bad_probe_options_are_one_line_errors(bad, word):
    spec = {"corruptions": "gaussian_noise,contrast", "probes": "seen", **bad}
    with pytest.raises(ConfigError, match=word):
        ctta.streams.create("digits_c", **spec)


def _tta_strategies():
    names = []
    for name in strategies.list_strategies():
        cls = strategies.STRATEGIES.get(name)
        if "tta" in getattr(cls, "settings", ()) and "adapt" in getattr(cls, "step_kinds", ()):
            names.append(name)
    return names


def _state(strategy):
    return copy.deepcopy(strategy.checkpoint_state())


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", _tta_strategies())
def test_a_probe_predicts_without_changing_any_state(name):
    """Probes are ``predict`` calls: after adapting, predicting on other images leaves every state as it was."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    source = {"source_data": (torch.rand(40, 3, 16, 16), torch.arange(40) % 10)}  # tiny stand-in source images
    needs_source = ("psmt", "eata")
    if name.startswith("lsa+"):  # composite: each part's hyperparameters under its name
        host = name.split("+", 1)[1]
        kw = {"lsa": {**source, "train_steps": 5}, **({host: source} if host in needs_source else {})}
    elif name == "lsa":
        kw = {**source, "train_steps": 5}
    else:
        kw = source if name in needs_source else {}
    try:
        s = strategies.create(name, make_tiny(num_classes=10), **kw)
    except CttaError as e:  # needs what no test has (e.g. a CLIP backbone): not a test-time probe question
        pytest.skip(f"{name}: {e}")
    s.adapt(x)
    before = _state(s)
    s.predict(torch.rand(16, 3, 16, 16))
    assert _equal(before, _state(s)), f"{name}.predict changed its state"


def test_folder_streams_take_probes_too(tmp_path):
    x = torch.rand(3, 100, 3, 8, 8)
    y = torch.arange(100) % 4
    s = ctta.streams.from_tensors({"day": (x[0], y), "dusk": (x[1], y), "night": (x[2], y)}, batch_size=10,
                                  probes="seen", probe_samples=20)
    assert [seg.name for seg in s] == ["day", "probes@day", "dusk", "probes@dusk", "night", "probes@night"]
    assert s.segments[-1].groups == ["day", "dusk", "night"] and s.segments[-1].meta["after"] == "night"
    assert s.segments[0].num_samples == 80
    res = ctta.run(s, strategies.create("bn", make_tiny()), device="cpu", progress=False)
    assert res.summary["accuracy_matrix"]["rows"] == ["day", "dusk", "night"]
    every = ctta.streams.from_tensors({"a": (x[0], y), "b": (x[1], y)}, batch_size=10, probes="all", probe_samples=20)
    assert [seg.name for seg in every] == ["probes@start", "a", "probes@a", "b", "probes@b"]
