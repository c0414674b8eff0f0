"""Continual-learning streams: class-incremental, few-shot, online, domain-incremental, GILCD and SFDA targets."""
from __future__ import annotations

import pytest
import torch

from ctta.errors import ConfigError
from ctta.streams import create
from ctta.streams.datasets import ImageSet
from ctta.streams.gilcd import gilcd_stream
from ctta.streams.incremental import class_incremental_stream, few_shot_stream
from ctta.streams.sfda import sfda_stream


def _set(n_cls: int = 6, per_class: int = 12, seed: int = 0, size: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(per_class)
    x = torch.randint(0, 256, (len(y), 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, y, [str(i) for i in range(n_cls)])


def _labels(seg) -> set:
    return set(seg.materialise(torch.device("cpu"))[1].tolist())


def _fingerprint(stream) -> list:
    out = []
    for seg in stream:
        x, y, _ = seg.materialise(torch.device("cpu"))
        out.append((seg.name, y.tolist(), float(x.sum())))
    return out


# ---- class-incremental ---------------------------------------------------------------------------------------------

def test_sessions_partition_the_classes_in_seeded_order():
    train, test = _set(), _set(seed=1, per_class=5)
    s = class_incremental_stream("ci", train, test, init_classes=2, increment=2, seed=3)
    order = s.spec["class_order"]
    assert sorted(order) == list(range(6)) and order != list(range(6))
    sessions = [seg for seg in s if seg.kind == "train"]
    assert [seg.role for seg in sessions] == ["session"] * 3
    assert [seg.meta["classes"] for seg in sessions] == [order[0:2], order[2:4], order[4:6]]
    for seg in sessions:
        assert _labels(seg) == set(seg.meta["classes"]) and seg.num_samples == 24
    assert s.setting == "class_incremental" and s.num_classes == 6


def test_eval_segments_hold_exactly_the_classes_seen_with_groups_and_after():
    train, test = _set(), _set(seed=1, per_class=5)
    s = class_incremental_stream("ci", train, test, init_classes=2, increment=2, seed=0)
    kinds = [seg.kind for seg in s]
    assert kinds == ["train", "eval"] * 3
    seen: list = []
    for k in range(3):
        tr, ev = s.segments[2 * k], s.segments[2 * k + 1]
        seen += tr.meta["classes"]
        assert ev.meta["after"] == tr.name == f"session-{k}"
        assert ev.groups == [f"session-{j}" for j in range(k + 1)]
        x, y, g = ev.materialise(torch.device("cpu"))
        assert set(y.tolist()) == set(seen) and len(y) == 5 * len(seen)
        for j in range(k + 1):  # group j holds exactly session j's classes
            assert set(y[g == j].tolist()) == set(s.segments[2 * j].meta["classes"])


def test_same_seed_same_stream_different_seed_different_stream():
    train, test = _set(), _set(seed=1, per_class=5)
    a = class_incremental_stream("ci", train, test, 2, 2, seed=5)
    b = class_incremental_stream("ci", train, test, 2, 2, seed=5)
    c = class_incremental_stream("ci", train, test, 2, 2, seed=6)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a) != _fingerprint(c)
    # the spec alone rebuilds it
    d = class_incremental_stream("ci", train, test, 2, 2, seed=0, class_order=a.spec["class_order"])
    assert [seg.meta.get("classes") for seg in d] == [seg.meta.get("classes") for seg in a]


def test_epochs_repeat_each_sample_once_per_epoch():
    train, test = _set(), _set(seed=1, per_class=5)
    s = class_incremental_stream("ci", train, test, 2, 2, seed=0, epochs=3)
    seg = s.segments[0]
    x, y, _ = seg.materialise(torch.device("cpu"))
    assert seg.num_samples == 72 == len(y)
    assert torch.equal(torch.sort(y[:24]).values, torch.sort(y[24:48]).values)


@pytest.mark.parametrize("kw, match", [
    (dict(init_classes=4, increment=4), "do not fit the 6 classes"),
    (dict(init_classes=2, increment=2, num_sessions=4), "need 8 classes"),
    (dict(init_classes=2, increment=2, class_order=[0, 1, 9]), "unknown class ids"),
    (dict(init_classes=2, increment=2, epochs=0), "epochs must be"),
    (dict(init_classes=0, increment=2), "init_classes must be"),
])
def test_bad_class_incremental_input_is_a_one_line_error(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        class_incremental_stream("ci", _set(), _set(seed=1), **kw)
    assert "\n" not in str(e.value)


def test_registered_digits_ci_and_online():
    s = create("digits_ci", init_classes=4, increment=3)
    assert [seg.meta["classes"] for seg in s if seg.kind == "train"] == \
        [s.spec["class_order"][:4], s.spec["class_order"][4:7], s.spec["class_order"][7:]]
    o = create("digits_online", train_per_class=20, test_per_class=5)
    assert o.setting == "online_class_incremental"
    for seg in (seg for seg in o if seg.kind == "train"):
        assert seg.batch_size == 10
        x, y, _ = seg.materialise(torch.device("cpu"))
        # each sample exactly once: no duplicated image among the session's images
        assert len(torch.unique(x.flatten(1), dim=0)) == len(x) == seg.num_samples == 40
    with pytest.raises(ConfigError, match="epochs must be 1"):
        create("digits_online", epochs=2)


# ---- few-shot ------------------------------------------------------------------------------------------------------

def test_few_shot_sessions_have_k_shots_and_are_disjoint():
    train, test = _set(n_cls=10, per_class=12), _set(n_cls=10, seed=1, per_class=4)
    s = few_shot_stream("fs", train, test, base_classes=4, ways=3, shots=2, seed=7)
    sessions = [seg for seg in s if seg.kind == "train"]
    assert len(sessions) == 3 and s.setting == "few_shot_class_incremental"
    base = sessions[0]
    assert base.num_samples == 4 * 12 and _labels(base) == set(range(4))  # natural order by default
    used = set()
    for k, seg in enumerate(sessions[1:], start=1):
        idx = s.spec["fewshot_indices"][k - 1]
        y = train.labels[torch.tensor(idx)]
        assert sorted(y.tolist()) == sorted(seg.meta["classes"] * 2)
        assert not used & set(idx)
        used |= set(idx)
        assert seg.num_samples == 6 and _labels(seg) == set(seg.meta["classes"])
    base_classes = set(sessions[0].meta["classes"])
    assert all(train.labels[i].item() not in base_classes for i in used)
    # the spec reproduces the shots; another seed draws others
    again = few_shot_stream("fs", train, test, 4, 3, 2, seed=0, fewshot_indices=s.spec["fewshot_indices"])
    content = lambda st: [(n, sorted(y), round(v, 3)) for n, y, v in _fingerprint(st)[2:]]  # noqa: E731
    assert content(again) == content(s)
    other = few_shot_stream("fs", train, test, 4, 3, 2, seed=8)
    assert other.spec["fewshot_indices"] != s.spec["fewshot_indices"]


def test_few_shot_bad_input():
    train, test = _set(n_cls=10, per_class=3), _set(n_cls=10, seed=1, per_class=2)
    with pytest.raises(ConfigError, match="shots=5 but class"):
        few_shot_stream("fs", train, test, base_classes=4, ways=3, shots=5)
    with pytest.raises(ConfigError, match="exactly 1 samples"):
        few_shot_stream("fs", train, test, 4, 3, 1, fewshot_indices=[[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ConfigError, match="outside"):
        few_shot_stream("fs", train, test, 4, 3, 1, fewshot_indices=[[0, 1, 999], [3, 4, 5]])


def test_registered_cifar100_fscil_default_protocol(tmp_path):
    import numpy as np

    x = np.zeros((100 * 6, 4, 4, 3), dtype=np.uint8)
    y = np.repeat(np.arange(100), 6)
    np.savez(tmp_path / "train.npz", images=x, labels=y)
    np.savez(tmp_path / "test.npz", images=x[:200], labels=y[::3])
    s = create("cifar100_fscil", data_root=str(tmp_path))
    sessions = [seg for seg in s if seg.kind == "train"]
    assert len(sessions) == 9 and sessions[0].meta["classes"] == list(range(60))
    assert all(seg.num_samples == 25 for seg in sessions[1:])


# ---- domain-incremental --------------------------------------------------------------------------------------------

def test_digits_domain_incremental():
    s = create("digits_di", corruptions="gaussian_noise,contrast", train_per_class=3, test_per_class=2)
    assert s.setting == "domain_incremental"
    assert [seg.name for seg in s] == ["gaussian_noise-5", "eval@gaussian_noise-5", "contrast-5", "eval@contrast-5"]
    x, y, g = s.segments[3].materialise(torch.device("cpu"))
    assert s.segments[3].groups == ["gaussian_noise-5", "contrast-5"] and g.bincount().tolist() == [20, 20]
    assert s.segments[3].meta["after"] == "contrast-5"
    assert not torch.equal(x[g == 0], x[g == 1])  # each group under its own corruption


# ---- GILCD ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_gilcd_never_shows_a_class_before_its_labelled_samples(seed):
    train, test = _set(n_cls=8, per_class=10), _set(n_cls=8, seed=1, per_class=8)
    s = gilcd_stream("g", train, test, base_classes=2, classes_per_stage=2, shots=3, seed=seed,
                     corruptions="gaussian_noise,brightness", severities=[3, 5])
    assert s.setting == "gilcd"
    labelled: set = set()
    adapt_seen: set = set()
    for seg in s:
        y = _labels(seg)
        if seg.kind == "train":
            if seg.name != "base":
                assert seg.num_samples == 3 * len(seg.meta["new_classes"])
                assert not y & labelled  # new classes only
            labelled |= y
        else:
            assert y <= labelled, f"{seg.name} shows {y - labelled} before their labelled samples"
            if seg.kind == "adapt":
                adapt_seen |= y
    assert adapt_seen == set(range(8))
    assert s.spec["corruptions"] == ["gaussian_noise", "brightness"] * 2 and s.spec["severities"] == [3, 5, 3, 5]
    evals = [seg for seg in s if seg.kind == "eval"]
    assert evals[-1].groups == ["stage-0", "stage-1", "stage-2", "stage-3"]
    assert evals[-1].meta["after"].startswith("stage-3/")


def test_gilcd_registered_and_bad_input():
    s = create("digits_gilcd", adapt_per_class=4, eval_per_class=4)
    assert len([seg for seg in s if seg.kind == "adapt"]) == 4
    with pytest.raises(ConfigError, match="shots=500 but class"):
        create("digits_gilcd", shots=500)
    with pytest.raises(ConfigError, match="do not fit"):
        create("digits_gilcd", base_classes=3, classes_per_stage=2)


# ---- SFDA ----------------------------------------------------------------------------------------------------------

def test_sfda_closed_partial_open():
    target = _set(n_cls=6, per_class=5)
    closed = sfda_stream("t", target, epochs=2)
    assert [seg.kind for seg in closed] == ["adapt", "adapt", "eval"] and closed.setting == "sfda"
    assert closed.segments[-1].meta["after"] == "target/epoch-1"
    part = sfda_stream("t", target, "partial", target_classes=[1, 4])
    assert _labels(part.segments[0]) == {1, 4} and part.num_classes == 6
    op = sfda_stream("t", target, "open", known_classes=[3, 0, 5])
    assert op.num_classes == 3 and op.spec["unknown_label"] == 3
    x, y, g = op.segments[-1].materialise(torch.device("cpu"))
    assert op.segments[-1].groups == ["known", "unknown"]
    assert set(y[g == 1].tolist()) == {3} and set(y[g == 0].tolist()) == {0, 1, 2}
    # the known classes are renumbered in the model's order: target class 3 -> 0, 0 -> 1, 5 -> 2, others -> 3
    mapped = torch.tensor([1, 3, 3, 0, 3, 2])[target.labels]  # the eval segment is shuffled: compare as multisets
    assert torch.equal(y.sort().values, mapped.sort().values)
    assert not torch.equal(y, y.sort().values), "eval batches are not class-sorted"


@pytest.mark.parametrize("kw, match", [
    (dict(variant="open"), "needs known_classes"),
    (dict(variant="partial", target_classes=[0, 9]), "unknown class ids"),
    (dict(variant="partial", target_classes=list(range(6))), "proper subset"),
    (dict(epochs=0), "epochs must be"),
    (dict(variant="weird"), "variant must be"),
])
def test_sfda_bad_input(kw, match):
    with pytest.raises(ConfigError, match=match):
        sfda_stream("t", _set(), **kw)


def test_sfda_registered_on_digits():
    s = create("sfda", num_samples=50, epochs=2)
    assert [seg.name for seg in s] == ["target/epoch-0", "target/epoch-1", "target/eval"]
    with pytest.raises(Exception, match="gaussian_nois"):
        create("sfda", target="gaussian_nois")


# ---- end to end ----------------------------------------------------------------------------------------------------

def test_class_incremental_stream_runs_through_the_engine():
    from conftest import make_tiny

    import ctta.engine
    from ctta.strategies import create as create_strategy

    train, test = _set(n_cls=4, per_class=8), _set(n_cls=4, seed=1, per_class=4)
    s = class_incremental_stream("ci", train, test, 2, 2, seed=0, batch_size=8)
    res = ctta.engine.run(s, create_strategy("finetune", make_tiny(num_classes=4)), device="cpu", progress=False)
    assert list(res.segments["segment"]) == [seg.name for seg in s]


def test_registered_cifar_streams_check_the_split_before_loading_data(tmp_path):
    # no data under tmp_path: a bad split must be reported, not the missing data
    with pytest.raises(ConfigError, match="do not fit the 10 classes"):
        create("cifar10_ci", data_root=str(tmp_path), init_classes=3, increment=2)
    with pytest.raises(ConfigError, match="need 110 classes"):
        create("cifar100_fscil", data_root=str(tmp_path), num_sessions=11)
    with pytest.raises(ConfigError, match="epochs must be"):
        create("cifar10c_di", data_root=str(tmp_path), epochs=0)
