"""UniTTA's unified sampler: the chain realises its transition matrix and each preset its intended marginals; the
stream follows the chain, is seeded, refuses bad options in one line and runs through ctta.run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctta.errors import ConfigError
from ctta.streams import create
from ctta.streams.unitta import (PRESETS, Axis, ChainSpec, chain_spec, preset_factors, resolve_scenario,
                                 sample_chain, unitta_code)

D, K = 3, 4  # small chains for the sampler tests


def _spec(name, max_state=300, d=D, k=K):
    return chain_spec(d, k, name, None, None, None, None, max_state)[0]


def _within(counts: np.ndarray, matrix: np.ndarray, z: float = 4.5) -> np.ndarray:
    """|f_ij - P_ij| <= z sqrt(P_ij (1 - P_ij) / n_i) + 1/n_i: the moves out of state i are n_i i.i.d. draws of
    row i (strong Markov property), so each frequency is binomial around P_ij."""
    n = counts.sum(1, keepdims=True)
    f = counts / np.maximum(n, 1)
    return np.abs(f - matrix) <= z * np.sqrt(matrix * (1 - matrix) / np.maximum(n, 1)) + 1 / np.maximum(n, 1)


def test_36_presets_and_unitta_codes_are_a_bijection():
    assert len(PRESETS) == 36 and len(set(PRESETS)) == 36
    codes = {unitta_code(p) for p in PRESETS}
    assert len(codes) == 36 and "i1i1" in codes and "nunu" in codes and "1u1u" in codes
    assert unitta_code("dom_niid_bal-cls_iid_imb") == "iun1"  # sh/run.sh: {cor class}{imb class}{cor dom}{imb dom}
    for p in PRESETS:
        assert resolve_scenario(unitta_code(p)) == p
    f = preset_factors("dom_iid_imb-cls_niid_bal", 15, 10)
    assert f == {"domain_cor": pytest.approx(1 / 15), "domain_imb": 5.0, "class_cor": 0.95, "class_imb": 1.0}


def test_axis_matrix_stationary_distribution_is_the_long_tail():
    a = Axis(5, 0.85, 5.0)
    assert a.consistent
    m = a.matrix
    assert np.allclose(m.sum(1), 1) and m[0, 0] == pytest.approx(0.85)
    w, v = np.linalg.eig(m.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    assert np.allclose(pi, a.ratios) and pi[0] / pi[-1] == pytest.approx(5.0)
    assert not Axis(5, 0.2, 5.0).consistent and not Axis(5, 1.0, 1.0).consistent  # caps impose these
    assert np.allclose(Axis(4, 0.25, 1.0).matrix, 0.25)  # cor = 1/K: i.i.d. rows


def test_long_draw_transition_frequencies_match_the_kronecker_matrix():
    spec = ChainSpec(D, K, domain_cor=0.7, domain_imb=2.0, class_cor=0.8, class_imb=3.0, max_state_samples=3000)
    assert spec.stop_rule == "first_state"  # unconstrained: the chain runs on its matrix until a state hits 3000
    draw = sample_chain(spec, seed=7)
    assert len(draw.states) > 15000
    full = draw.transition_counts()
    assert _within(full, spec.matrix).all()
    assert np.allclose(spec.matrix, np.kron(spec.domain.matrix, spec.klass.matrix))
    for axis, m in (("domain", spec.domain.matrix), ("class", spec.klass.matrix)):
        c = draw.transition_counts(axis)
        assert _within(c, m).all(), axis
    f = draw.transition_counts("class") / draw.transition_counts("class").sum(1, keepdims=True)
    print("class self-transition measured", np.round(np.diag(f), 3), "specified", np.round(spec.klass.stay, 3))


def test_same_seed_same_draw_other_seed_other_draw():
    spec = _spec("dom_niid_imb-cls_niid_bal")
    a, b, c = sample_chain(spec, 1), sample_chain(spec, 1), sample_chain(spec, 2)
    assert np.array_equal(a.states, b.states) and not np.array_equal(a.states, c.states)


def _profile(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum()


def spec_capped(name):
    return _spec(name).stop_rule != "first_state"


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_reproduces_its_marginals(name):
    dc, db = name.split("-")[0].split("_")[1:]
    cc, cb = name.split("-")[1].split("_")[1:]
    spec = _spec(name, max_state=400 if spec_capped(name) else 1500)
    draw = sample_chain(spec, seed=3)
    counts = draw.state_counts()
    for axis, imb_kind, hist, seq in (("domain", db, counts.sum(1), draw.domains),
                                      ("class", cb, counts.sum(0), draw.classes)):
        ax = spec.domain if axis == "domain" else spec.klass
        target = ax.ratios
        assert (ax.imb == 1.0) == (imb_kind == "bal")
        capped = {"state_caps": True, "domain_caps": axis == "domain", "class_caps": axis == "class",
                  "first_state": False}[spec.stop_rule]
        if capped:  # caps give the ratios up to rounding
            assert np.allclose(_profile(hist), target, rtol=0.02, atol=0.005), (axis, _profile(hist), target)
            if imb_kind == "imb":
                assert hist[0] / hist[-1] == pytest.approx(ax.imb, rel=0.1)
            continue
        # the chain's time in state k: about R_k runs of geometric length, so a relative sd of ~sqrt(2 / R_k)
        starts = np.concatenate([[True], seq[1:] != seq[:-1]])
        runs = np.bincount(seq[starts], minlength=len(target))
        tol = 4 * target * np.sqrt(2 / np.maximum(runs, 1)) + 0.005
        assert (np.abs(_profile(hist) - target) <= tol).all(), (axis, _profile(hist), target, tol)
    doms, cls = draw.domains, draw.classes
    if dc == "cont":  # one domain after another, each once, in order
        assert (np.diff(doms) >= 0).all() and len(np.unique(doms)) == D
    if cc == "cont":  # classes one after another (within each domain when domains are continual too)
        key = doms * K + cls if dc == "cont" else cls
        assert (np.diff(key) >= 0).all()
    if dc == "iid" and db == "bal" and cc == "iid" and cb == "bal":
        same = (np.diff(draw.states) == 0).mean()
        assert same == pytest.approx(1 / (D * K), abs=0.03)  # i.i.d.: a repeat as often as chance


def test_stream_follows_the_chain_with_domains_as_groups():
    s = create("unitta", scenario="dom_cont_imb-cls_iid_bal", corruptions="brightness,contrast",
               max_state_samples=6, batch_size=16, num_classes=4)
    seg = s.segments[0]
    assert len(s.segments) == 1 and seg.kind == "adapt" and seg.groups == ["brightness-5", "contrast-5"]
    x, y, g = seg.materialise("cpu")
    spec, _ = chain_spec(2, 4, "dom_cont_imb-cls_iid_bal", None, None, None, None, 6)
    draw = sample_chain(spec, 1)
    assert torch.equal(y, torch.from_numpy(draw.classes)) and torch.equal(g, torch.from_numpy(draw.domains))
    assert s.spec["domain_counts"] == [24, 4] == draw.state_counts().sum(1).tolist()  # caps 6 x 4, 6/5 x 4
    assert s.spec["class_counts"] == draw.state_counts().sum(0).tolist()
    assert seg.meta["domain_transitions"] == draw.transition_counts("domain").tolist()
    assert s.provenance["contrast-5"]["source"] == "generated"
    # each image is its clean image under its domain's corruption (brightness: domain 0)
    from ctta.streams.corruptions import corrupt
    from ctta.streams.digits import load_digits

    clean = load_digits()
    first = int(torch.nonzero(g == 0)[0])
    cand = torch.nonzero(clean.labels == y[first]).flatten()
    ref = corrupt(clean.images[cand].float() / 255, "brightness", 5, seed=1)
    assert (ref - x[first]).abs().flatten(1).amax(1).min() < 1e-6
    again = create("unitta", scenario="dom_cont_imb-cls_iid_bal", corruptions="brightness,contrast",
                   max_state_samples=6, batch_size=16, num_classes=4)
    assert torch.equal(again.segments[0].materialise("cpu")[0], x)


@pytest.mark.parametrize("bad,word", [
    ({"scenario": "iid"}, "scenario"),
    ({"scenario": None, "domain_cor": 0.5}, "missing"),
    ({"class_imb": 0.5}, "class_imb"),
    ({"domain_cor": 1.5}, "domain_cor"),
    ({"max_state_samples": 0}, "max_state_samples"),
    ({"dataset": "mnist"}, "dataset"),
    ({"severity": 7}, "severity"),
    ({"num_classes": 11}, "num_classes"),
    ({"corruptions": "fog,fog"}, "distinct"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_option_is_a_one_line_config_error(bad, word):
    with pytest.raises(ConfigError) as e:
        create("unitta", **bad)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_stream_runs_through_ctta_run(tmp_path):
    import json

    import ctta
    from ctta import strategies
    from conftest import make_tiny

    s = create("unitta", scenario="i1n1", corruptions="brightness,contrast", max_state_samples=3, batch_size=16)
    assert s.spec["scenario"] == "dom_niid_bal-cls_iid_bal" and s.spec["unitta_code"] == "i1n1"
    torch.set_num_threads(1)
    ctta.run(s, strategies.create("bn", make_tiny(num_classes=10)), device="cpu", out=tmp_path / "run",
             progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["domain_error"]) == {"brightness-5", "contrast-5"}
    assert summary["stream_spec"]["num_samples"] == s.segments[0].num_samples


def test_scenario_grid_report(tmp_path):
    import json

    from ctta.evaluation.scenario_grid import write_scenario_grid

    for sc, code in (("dom_iid_bal-cls_iid_bal", "i1i1"), ("dom_cont_bal-cls_cont_bal", "1111")):
        for st, acc in (("source", 0.5), ("bn", 0.75)):
            run = tmp_path / sc / "tiny" / st / "seed-1"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"online_accuracy": acc, "mean_error": 1.0,
                                                          "stream_spec": {"scenario": sc, "unitta_code": code,
                                                                          "num_samples": 40}}))
    files = write_scenario_grid(tmp_path, strategies=["source", "bn"])
    md = files["markdown"].read_text()
    assert "| dom_cont_bal-cls_cont_bal | 1111 | 40 | 50.0 | **25.0** |" in md
    assert files["heatmap"].is_file() and files["csv"].is_file()
