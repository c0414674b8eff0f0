"""TTA stream orders and label shift: statistics proving each schedule does what its spec says.

Most streams here are built over a tiny synthetic test set whose images encode their own identity (pixel 0 =
index, channel 1 = severity, channel 2 = corruption number) and served through the ``files`` hook as "-C files",
so a materialised segment can be decoded back to (sample, corruption, severity) exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctta.errors import ConfigError
from ctta.streams import create
from ctta.streams.corruption_stream import check_stream_options, corruption_stream
from ctta.streams.datasets import ImageSet
from ctta.streams.label_shift import (check_label_shift, dirichlet_order, longtail_counts, prior_counts, run_lengths,
                                      select_counts, zipf_proportions)
from ctta.streams.orders import severity_schedule

NAMES = ["gaussian_noise", "shot_noise", "contrast"]
N, K = 600, 10


def _clean(n: int = N, k: int = K, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ImageSet(images, labels, [str(i) for i in range(k)])


def _files(clean: ImageSet):
    def files(c: str, s: int) -> ImageSet:
        x = clean.images.clone()
        x[:, 1] = s
        x[:, 2] = NAMES.index(c) + 1
        return ImageSet(x, clean.labels.clone(), list(clean.classes))
    return files


def _stream(clean: ImageSet = None, **kw):
    clean = clean if clean is not None else _clean()
    kw.setdefault("corruptions", NAMES)
    kw.setdefault("batch_size", 50)
    kw.setdefault("clean_eval", False)
    return corruption_stream("synthetic", clean, files=_files(clean), **kw)


def _decode(x: torch.Tensor):
    """(sample index, severity, corruption number) per image; severity 0 / corruption 0 = a clean image."""
    v = (x * 255).round().long()
    return v[:, 0, 0, 0] + 256 * v[:, 0, 0, 1], v[:, 1, 0, 0], v[:, 2, 0, 0]


def _load(seg):
    x, y, g = seg.materialise(torch.device("cpu"))
    idx, sev, cor = _decode(x)
    return idx, sev, cor, y, g


# ---------------------------------------------------------------- label shift schedules (pure functions)

def test_dirichlet_small_delta_gives_long_runs_and_keeps_the_histogram():
    y = _clean(2000).labels
    small = dirichlet_order(y, 0.01, seed=3)
    large = dirichlet_order(y, 100.0, seed=3)
    for order in (small, large):
        assert torch.equal(order.sort().values, torch.arange(len(y)))  # a permutation: same samples
        assert torch.equal(torch.bincount(y[order]), torch.bincount(y))
    run_small = run_lengths(y[small]).float().mean()
    run_large = run_lengths(y[large]).float().mean()
    run_iid = run_lengths(y).float().mean()
    assert run_small > 100 and run_small > 5 * run_large and run_large > 5 * run_iid
    assert torch.equal(dirichlet_order(y, 0.01, seed=3), small)
    assert not torch.equal(dirichlet_order(y, 0.01, seed=4), small)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_longtail_counts_realise_rho_and_direction(direction):
    counts = longtail_counts(10, 500, 100, direction)
    assert max(counts) == 500 and min(counts) == 5 and max(counts) / min(counts) == 100
    strictly = all(a > b for a, b in zip(counts, counts[1:]))
    assert strictly if direction == "forward" else all(a < b for a, b in zip(counts, counts[1:]))
    assert longtail_counts(10, 500, 100, "uniform") == [500] * 10


def test_longtail_budget_and_rounding():
    counts = prior_counts({"kind": "longtail", "rho": 10.0, "direction": "forward"}, [60] * 10, None, seed=0)
    assert max(counts) == 60 and min(counts) == 6
    budget = prior_counts({"kind": "longtail", "rho": 10.0, "direction": "backward"}, [60] * 10, 100, seed=0)
    assert sum(budget) <= 100 and budget[-1] == max(budget)
    assert abs(max(budget) / min(budget) - 10) <= 10 * 0.5 / min(budget)  # rho up to rounding
    with pytest.raises(ConfigError, match="rarest"):
        prior_counts({"kind": "longtail", "rho": 1000.0, "direction": "forward"}, [60] * 10, None, seed=0)


def test_zipf_marginals_follow_lames_prior_without_repeats():
    p = zipf_proportions(10, 2.0, seed=5)
    assert p.sum() == pytest.approx(1) and p.max() < 0.9  # top 10% of 10 classes = 1 class, under 90%
    counts = prior_counts({"kind": "zipf", "a": 2.0, "top_fraction": 0.1, "top_share": 0.9}, [60] * 10, None, seed=5)
    assert max(counts) == 60  # the largest class is used up, the others in proportion
    scale = 60 / p.max()
    assert all(abs(c - scale * q) < 1 for c, q in zip(counts, p))
    assert not (zipf_proportions(10, 2.0, seed=6) == p).all()


def test_select_counts_takes_the_first_of_each_class_in_order():
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    pos = select_counts(y, [0, 1, 2], [2, 1, 0])
    assert pos.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- orders

def test_continual_and_random_and_reset_orders():
    s = _stream(num_samples=100)
    assert [seg.name for seg in s] == [f"{c}-5" for c in NAMES] and not s.reset_each_domain
    r = _stream(num_samples=100, order="random", seed=2)
    assert sorted(seg.name for seg in r) == sorted(seg.name for seg in s)
    assert _stream(num_samples=100, order="reset").reset_each_domain
    for seg in s:
        idx, sev, cor, y, g = _load(seg)
        assert g is None and len(set(idx.tolist())) == 100 and (sev == 5).all()
        assert (cor == NAMES.index(seg.meta["corruption"]) + 1).all()
        assert torch.equal(y, _clean().labels[idx])


@pytest.mark.parametrize("order", ["gradual", "gradual_cotta"])
def test_gradual_severities_follow_the_schedule(order):
    s = _stream(num_samples=40, order=order)
    assert severity_schedule("gradual", 1, 5) == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    for i, seg in enumerate(s):
        want = (5, 4, 3, 2, 1) if (order == "gradual_cotta" and i == 0) else (1, 2, 3, 4, 5, 4, 3, 2, 1)
        idx, sev, cor, y, g = _load(seg)
        assert seg.meta["severities"] == list(want) and len(idx) == 40 * len(want)
        blocks = sev.view(len(want), 40)
        assert all((b == w).all() for b, w in zip(blocks, want))  # each sub-block from the file of its severity
        assert seg.groups == [f"{NAMES[i]}-{k}" for k in range(1, 6)]
        assert torch.equal(g, sev - 1)
        assert len(set(idx.tolist())) == len(idx)  # 9 x 40 <= 600: no image met twice in the domain


def test_gradual_generated_on_digits():
    s = create("digits_c", corruptions="gaussian_noise,contrast", num_samples=10, order="gradual", severity=3,
               clean_eval=False)
    seg = s.segments[0]
    x, y, g = seg.materialise(torch.device("cpu"))
    assert seg.meta["severities"] == [1, 2, 3, 2, 1] and x.shape[0] == 50 and seg.meta["source"] == "generated"
    assert g.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [1] * 10 + [0] * 10
    # same severity at two steps: different images and different noise
    assert not torch.equal(x[10:20], x[30:40])


def test_mixed_covers_every_domain_with_its_group():
    s = _stream(num_samples=100, order="mixed")
    assert len(s) == 1
    seg = s.segments[0]
    assert seg.groups == [f"{c}-5" for c in NAMES]
    idx, sev, cor, y, g = _load(seg)
    assert torch.equal(g + 1, cor)  # group index = the domain each sample came from
    assert torch.bincount(g).tolist() == [100] * len(NAMES)
    assert len(set(zip(idx.tolist(), cor.tolist()))) == len(idx)  # no (sample, domain) twice
    assert run_lengths(g).float().mean() < 3  # shuffled, not domain after domain


def test_long_term_repeats_verbatim_and_recurring_redraws():
    lt = _stream(num_samples=100, order="long_term", rounds=3)
    assert lt.spec["rounds"] == 3 and [seg.name for seg in lt][:4] == [f"{c}-5#1" for c in NAMES] + [f"{NAMES[0]}-5#2"]
    first = [_load(seg)[0] for seg in lt.segments[:3]]
    third = [_load(seg)[0] for seg in lt.segments[6:]]
    assert all(torch.equal(a, b) for a, b in zip(first, third))
    rec = _stream(num_samples=100, order="recurring")
    assert rec.spec["rounds"] == 10 and len(rec) == 30
    r1, r2 = _load(rec.segments[0])[0], _load(rec.segments[3])[0]
    assert len(set(r1.tolist())) == 100 and len(set(r2.tolist())) == 100 and not torch.equal(r1, r2)
    # with the whole set per domain a round is a fresh order of the same samples
    full = _stream(order="recurring", rounds=2)
    a, b = _load(full.segments[0])[0], _load(full.segments[3])[0]
    assert torch.equal(a.sort().values, b.sort().values) and not torch.equal(a, b)


def test_interleaved_clean_domains():
    s = _stream(num_samples=50, interleave_clean=True)
    assert [seg.name for seg in s] == ["gaussian_noise-5", "clean-after-gaussian_noise-5", "shot_noise-5",
                                       "clean-after-shot_noise-5", "contrast-5"]
    idx, sev, cor, y, g = _load(s.segments[1])
    assert (sev == 0).all() and (cor == 0).all() and s.segments[1].role == "domain" and s.segments[1].meta["clean"]


@pytest.mark.parametrize("order", ["continual", "gradual", "mixed"])
def test_clean_ratio_realised_in_every_batch(order):
    s = _stream(num_samples=90, order=order, clean_ratio=0.2, batch_size=50)
    for seg in s:
        idx, sev, cor, y, g = _load(seg)
        clean_group = seg.groups.index("clean")
        assert seg.groups[-1] == "clean" and torch.equal(g == clean_group, cor == 0)
        if order == "continual":
            assert seg.groups == ["shifted", "clean"]
        n_shifted = int((cor != 0).sum())
        assert n_shifted == 90 * (9 if order == "gradual" else 1) * (len(NAMES) if order == "mixed" else 1)
        batches = (cor == 0).split(50)
        for b in batches[:-1]:
            assert int(b.sum()) == 10
        last = batches[-1]
        assert abs(int(last.sum()) - 0.2 * len(last)) <= 1
        assert len(set(idx[cor == 0].tolist())) == int((cor == 0).sum())  # clean samples not repeated


def test_label_shift_combines_with_orders():
    clean = _clean()
    lt = _stream(clean, order="gradual", num_samples=100,
                 label_shift=[{"kind": "longtail", "rho": 10, "direction": "backward"}, "dirichlet"])
    counts = lt.spec["class_counts"]
    assert sum(counts) <= 100 and counts[-1] == max(counts) and max(counts) / min(counts) == pytest.approx(10, rel=0.1)
    idx, sev, cor, y, g = _load(lt.segments[0])
    for block, ids in zip(y.view(9, -1), idx.view(9, -1)):
        assert torch.bincount(block, minlength=K).tolist() == counts
        assert len(set(ids.tolist())) == len(ids)  # (9 x 24 of class 9 > its 60 images: repeats only across steps)
    d = _stream(clean, label_shift={"kind": "dirichlet", "delta": 0.01})
    iid = _stream(clean)
    for a, b in zip(d, iid):
        ya, yb = _load(a)[3], _load(b)[3]
        assert torch.equal(torch.bincount(ya), torch.bincount(yb))
        assert run_lengths(ya).float().mean() > 10 * run_lengths(yb).float().mean()
    mixed = _stream(clean, order="mixed", num_samples=200, label_shift={"kind": "dirichlet", "delta": 0.01})
    y = _load(mixed.segments[0])[3]
    assert run_lengths(y).float().mean() > 20
    z = _stream(clean, label_shift={"kind": "zipf", "a": 2})
    assert torch.bincount(_load(z.segments[0])[3], minlength=K).tolist() == z.spec["class_counts"]


def test_same_spec_same_stream_other_seed_other_stream():
    kw = dict(order="mixed", num_samples=80, clean_ratio=0.1, label_shift={"kind": "dirichlet", "delta": 0.1})
    a, b, c = _stream(seed=1, **kw), _stream(seed=1, **kw), _stream(seed=2, **kw)
    xa, xb, xc = (s.segments[0].materialise(torch.device("cpu"))[0] for s in (a, b, c))
    assert a.spec == b.spec and torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert a.spec["label_shift"] == [{"kind": "dirichlet", "delta": 0.1}] and a.spec["clean_ratio"] == 0.1
    d1 = create("digits_c", num_samples=30, order="recurring", rounds=2, corruptions="gaussian_noise")
    d2 = create("digits_c", num_samples=30, order="recurring", rounds=2, corruptions="gaussian_noise")
    assert torch.equal(d1.segments[1].materialise("cpu")[0], d2.segments[1].materialise("cpu")[0])
    assert not torch.equal(d1.segments[1].materialise("cpu")[0], d1.segments[2].materialise("cpu")[0])


BAD = [
    ({"label_shift": {"kind": "longtail", "rho": 0.5}}, "rho"),
    ({"label_shift": {"kind": "dirichlet", "delta": 0}}, "delta"),
    ({"label_shift": {"kind": "dirichlet", "delta": -1}}, "delta"),
    ({"label_shift": {"kind": "sorted"}}, "kind"),
    ({"label_shift": {"kind": "longtail", "direction": "sideways"}}, "direction"),
    ({"label_shift": {"kind": "dirichlet", "alpha": 1}}, "alpha"),
    ({"label_shift": {"kind": "zipf", "a": 1}}, "a must be"),
    ({"order": "shuffled"}, "order"),
    ({"clean_ratio": 1.0}, "clean_ratio"),
    ({"clean_ratio": -0.1}, "clean_ratio"),
    ({"clean_ratio": 0.001}, "clean_ratio"),
    ({"rounds": 0}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"interleave_clean": "yes"}, "interleave_clean"),
]


@pytest.mark.parametrize("bad,word", BAD)
def test_bad_spec_is_a_one_line_config_error_before_any_work(bad, word, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data was loaded before the spec was checked")

    monkeypatch.setattr("ctta.streams.digits.load_digits", boom)
    with pytest.raises(ConfigError, match=word) as e:
        create("digits_c", **bad)
    assert "\n" not in str(e.value)


def test_label_shift_spec_normalisation():
    assert check_label_shift(None) == [] and check_label_shift("none") == []
    assert check_label_shift("longtail") == [{"kind": "longtail", "rho": 100.0, "direction": "forward"}]
    with pytest.raises(ConfigError, match="at most one"):
        check_label_shift(["longtail", "zipf"])
    assert check_stream_options(5, 64, None, "long_term").rounds == 10


def test_cli_overrides_and_experiment_files_reach_the_stream():
    from ctta.config import check_options, load_yaml, resolve
    from ctta.streams import STREAMS

    cfg = resolve(None, {"stream": {"name": "digits_c", "order": "gradual"}},
                  ["stream.label_shift.kind=longtail", "stream.label_shift.rho=10", "stream.clean_ratio=0.25",
                   "stream.rounds=2", "stream.num_samples=50"])
    spec = {k: v for k, v in cfg["stream"].items() if k != "name"}
    s = create("digits_c", **spec)
    assert s.spec["order"] == "gradual" and s.spec["label_shift"][0]["rho"] == 10 and s.spec["rounds"] == 2
    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    files = sorted(root.glob("cifar10c_*.yaml"))
    assert len(files) >= 4
    for f in files:
        st = resolve(load_yaml(f))["stream"]
        opts = {k: v for k, v in st.items() if k != "name"}
        check_options(STREAMS.get(st["name"]), opts, st["name"], "option")
        check_stream_options(opts.get("severity", 5), opts.get("batch_size", 200), opts.get("num_samples"),
                             opts.get("order", "continual"), opts.get("rounds"), opts.get("interleave_clean", False),
                             opts.get("clean_ratio", 0.0), opts.get("label_shift"))


# ---------------------------------------------------------------- CIFAR-10-C files alone, provenance, generate_missing

C_N = 20  # images per severity of the tiny -C files below


def _c_release(folder: Path, corruptions=("gaussian_noise",), seed: int = 0):
    """A released-layout -C folder: ``<c>.npy`` (5 x C_N images; pixel (0, 0) = index, channel 1 = severity) and
    ``labels.npy`` (the C_N labels tiled 5 times, as released). Returns the labels of one severity."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(seed).integers(0, 10, C_N).astype(np.uint8)
    stack = np.zeros((5 * C_N, 32, 32, 3), np.uint8)
    for s in range(5):
        stack[s * C_N:(s + 1) * C_N, 0, 0, 0] = np.arange(C_N)
        stack[s * C_N:(s + 1) * C_N, :, :, 1] = s + 1
    for c in corruptions:
        np.save(folder / f"{c}.npy", stack)
    np.save(folder / "labels.npy", np.tile(labels, 5))
    return labels


@pytest.mark.parametrize("at_c_folder", [False, True])
def test_cifar10c_runs_from_the_c_files_alone_with_labels_from_labels_npy(tmp_path, at_c_folder, caplog):
    import logging

    labels = _c_release(tmp_path / "CIFAR-10-C")
    root = tmp_path / "CIFAR-10-C" if at_c_folder else tmp_path
    caplog.set_level(logging.INFO, logger="ctta.streams")
    s = create("cifar10c", data_root=str(root), corruptions="gaussian_noise", severity=3, batch_size=8)
    assert [seg.name for seg in s] == ["gaussian_noise-3"]  # no clean probes: there is no clean set
    assert s.spec["clean_eval"] is False and s.spec["generate_missing"] is True
    assert any("clean probes" in r.message and "skipped" in r.message and r.levelno == logging.WARNING
               for r in caplog.records)
    x, y = s.segments[0].materialise(torch.device("cpu"))[:2]
    idx = (x[:, 0, 0, 0] * 255).round().long()
    assert sorted(idx.tolist()) == list(range(C_N)) and ((x[:, 1] * 255).round() == 3).all()
    assert y.tolist() == labels[idx.numpy()].tolist()
    path = str(tmp_path / "CIFAR-10-C" / "gaussian_noise.npy")
    assert s.provenance == {"gaussian_noise-3": {"source": "files", "path": path, "corruption": "gaussian_noise",
                                                  "severity": 3}}


@pytest.mark.parametrize("asked, word", [
    ({"corruptions": "gaussian_noise,fog"}, "generating it needs the clean cifar10 test set"),
    ({"interleave_clean": True}, "interleave_clean needs the clean test set"),
    ({"clean_ratio": 0.25}, "clean_ratio 0.25 needs the clean test set"),
])
def test_what_needs_the_clean_set_is_a_one_line_error_from_the_c_files_alone(tmp_path, asked, word):
    from ctta.errors import DataNotFoundError

    _c_release(tmp_path / "CIFAR-10-C")
    spec = {"corruptions": "gaussian_noise", "batch_size": 8, **asked}
    with pytest.raises(DataNotFoundError, match=word) as e:
        create("cifar10c", data_root=str(tmp_path), **spec)
    assert "\n" not in str(e.value) and "--download" in str(e.value)


def _clean_npz(root: Path, labels) -> None:
    import numpy as np

    images = np.random.default_rng(1).integers(0, 256, (C_N, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "test.npz", images=images, labels=labels)


def test_missing_c_file_with_generate_missing_false_is_a_one_line_error(tmp_path):
    from ctta.errors import DataNotFoundError

    labels = _c_release(tmp_path / "CIFAR-10-C", corruptions=("contrast",))
    _clean_npz(tmp_path, labels)
    with pytest.raises(DataNotFoundError, match="generate_missing is false.*missing gaussian_noise.npy") as e:
        create("cifar10c", data_root=str(tmp_path), corruptions="gaussian_noise,contrast", generate_missing=False)
    assert "\n" not in str(e.value) and str(tmp_path / "CIFAR-10-C") in str(e.value)
    with pytest.raises(ConfigError, match="generate_missing must be true or false"):
        create("cifar10c", data_root=str(tmp_path), generate_missing="no")


def test_missing_c_file_is_generated_visibly_and_recorded_in_summary_and_report(tmp_path, caplog):
    import json
    import logging

    import ctta
    from ctta import strategies
    from conftest import make_tiny

    labels = _c_release(tmp_path / "CIFAR-10-C", corruptions=("contrast",))
    _clean_npz(tmp_path, labels)
    caplog.set_level(logging.INFO, logger="ctta.streams")
    s = create("cifar10c", data_root=str(tmp_path), corruptions="gaussian_noise,contrast", batch_size=10,
               severity=2)
    assert any(r.levelno == logging.INFO and "no -C files for gaussian_noise" in r.message for r in caplog.records)
    assert s.provenance["gaussian_noise-2"]["source"] == "generated"
    assert s.provenance["contrast-2"] == {"source": "files", "path": str(tmp_path / "CIFAR-10-C" / "contrast.npy"),
                                          "corruption": "contrast", "severity": 2}
    assert "provenance" not in s.spec and "data_sources" not in s.spec  # the resumed-run check compares the spec
    ctta.run(s, strategies.create("source", make_tiny(num_classes=10)), device="cpu", out=tmp_path / "run",
             progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_sources"]["gaussian_noise-2"]["source"] == "generated"
    assert summary["data_sources"]["contrast-2"]["path"].endswith("CIFAR-10-C/contrast.npy")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Data sources" in page and "contrast.npy" in page and "generated" in page


def test_truncated_test_npz_is_a_one_line_error_for_the_stream(tmp_path):
    labels = _c_release(tmp_path / "CIFAR-10-C")
    _clean_npz(tmp_path, labels)
    data = (tmp_path / "test.npz").read_bytes()
    (tmp_path / "test.npz").write_bytes(data[:len(data) // 3])
    with pytest.raises(ConfigError, match="test.npz: not a readable .npz file") as e:
        create("cifar10c", data_root=str(tmp_path), corruptions="gaussian_noise")
    assert "\n" not in str(e.value)
