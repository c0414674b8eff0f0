"""Every run carries its fingerprint (versions, commit, device, data files, weights, settings); a comparison of runs
that differ in it warns, naming the field."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ctta
from ctta import provenance, strategies
from ctta.evaluation.compare import load_run, write_comparison_report

from conftest import make_tiny


def _run(out, **spec):
    s = ctta.streams.create("digits_c", corruptions="gaussian_noise", batch_size=32, num_samples=64, **spec)
    return ctta.run(s, strategies.create("bn", make_tiny(num_classes=10)), device="cpu", progress=False, out=out)


def test_summary_holds_versions_device_data_and_settings(tmp_path):
    res = _run(tmp_path / "a")
    fp = json.loads((tmp_path / "a" / "summary.json").read_text())["fingerprint"]
    assert fp["packages"]["torch"] and fp["python"]
    assert fp["packages"]["ctta-bench"] == ctta.__version__
    assert fp["device"]["type"] == "cpu" and fp["device"]["dtype"] == "float32"
    assert fp["data"]["gaussian_noise-5"]["source"] == "generated" and len(fp["corruption_engine"]) == 16
    assert len(fp["config_sha256"]) == 16 and res.summary["fingerprint"] == fp


def test_file_digest_and_weights_hash(tmp_path):
    f = tmp_path / "fog.npy"
    np.save(f, np.arange(10))
    d = provenance.file_digest(f)
    assert d["bytes"] == f.stat().st_size and len(d["sha256_head"]) == 64
    w = tmp_path / "w.pt"
    torch.save({"a": torch.ones(3)}, w)
    fp = provenance.fingerprint({"backbone": {"name": "x", "weights": str(w)}}, {"fog-5": {"source": "files",
                                                                                           "path": str(f)}},
                                torch.device("cpu"))
    assert fp["weights"]["sha256"] and fp["data"]["fog-5"]["sha256_head"] == d["sha256_head"]


def test_a_changed_setting_or_version_changes_the_fingerprint_and_the_report_warns(tmp_path, caplog):
    cfg = {"stream": {"name": "digits_c", "severity": 5, "seed": 1}, "strategy": {"name": "bn"},
           "backbone": {"name": "tiny_cnn"}, "run": {"seed": 1, "device": "cpu", "out": "x"}}
    base = provenance.fingerprint(cfg, {}, torch.device("cpu"))
    other_seed = provenance.fingerprint({**cfg, "run": {**cfg["run"], "seed": 2, "out": "y"},
                                         "stream": {**cfg["stream"], "seed": 2}}, {}, torch.device("cpu"))
    assert provenance.fingerprint_differences([("a", base), ("b", other_seed)]) == []  # seeds and folders may vary
    changed = provenance.fingerprint({**cfg, "stream": {**cfg["stream"], "severity": 3}}, {}, torch.device("cpu"))
    assert changed["config_sha256"] != base["config_sha256"]
    lines = provenance.fingerprint_differences([("a", base), ("b", changed)])
    assert len(lines) == 1 and "stream.severity" in lines[0]
    newer = json.loads(json.dumps(base))
    newer["packages"]["timm"] = "9.9.9"
    assert "packages.timm" in provenance.fingerprint_differences([("a", base), ("b", newer)])[0]
    # the comparison report says it
    _run(tmp_path / "r1")
    _run(tmp_path / "r2")
    s2 = json.loads((tmp_path / "r2" / "summary.json").read_text())
    s2["fingerprint"]["packages"]["numpy"] = "0.0.1"
    (tmp_path / "r2" / "summary.json").write_text(json.dumps(s2))
    files = write_comparison_report([load_run(tmp_path / "r1"), load_run(tmp_path / "r2")], tmp_path / "cmp")
    assert "packages.numpy" in files["markdown"].read_text()
