"""Custom streams from tensors, torch Datasets, image folders and YAML specs; Avalanche export and import."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ctta.errors import ConfigError, DataNotFoundError
from ctta.streams import create, from_dataset, from_folders, from_tensors
from ctta.streams.datasets import ImageSet
from ctta.streams.incremental import class_incremental_stream


def _write_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 8, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_from_tensors_one_and_several_domains():
    x, y = torch.rand(10, 3, 4, 4), torch.arange(10) % 3
    s = from_tensors(x, y, batch_size=4)
    assert len(s) == 1 and s.segments[0].kind == "adapt" and s.segments[0].num_batches == 3 and s.num_classes == 3
    xb, yb, _ = s.segments[0].materialise(torch.device("cpu"))
    assert torch.equal(xb, x) and torch.equal(yb, y)
    s2 = from_tensors([x, x[:4]], [y, y[:4]], kind=["train", "eval"], domains=["a", "b"])
    assert [(g.name, g.kind, g.role) for g in s2] == [("a", "train", "domain"), ("b", "eval", "probe")]
    s3 = from_tensors({"fog": (x, y)}, kind="adapt")
    assert s3.domains() == ["fog"]
    with pytest.raises(ConfigError, match="10 images but 4 labels"):
        from_tensors(x, y[:4])
    with pytest.raises(ConfigError, match="kind must be one of"):
        from_tensors(x, y, kind="learn")


def test_from_dataset():
    ds = TensorDataset(torch.rand(7, 3, 4, 4), torch.arange(7) % 2)
    s = from_dataset([ds, ds], kind="adapt", domains=["d1", "d2"], batch_size=3)
    assert [g.num_samples for g in s] == [7, 7] and s.num_classes == 2
    with pytest.raises(ConfigError, match="empty"):
        from_dataset(TensorDataset(torch.rand(0, 3, 4, 4), torch.zeros(0)))


def test_from_folders_and_the_folders_spec(tmp_path):
    _write_folder(tmp_path / "day")
    _write_folder(tmp_path / "night", classes=("dog", "fox"), seed=1)
    s = from_folders({"day": tmp_path / "day", "night": tmp_path / "night"}, kind=["train", "adapt"], batch_size=4)
    assert s.num_classes == 3  # cat, dog, fox shared across domains
    x, y, _ = s.segments[1].materialise(torch.device("cpu"))
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [1, 1, 1, 2, 2, 2]
    spec = {"domains": [{"name": "day", "path": str(tmp_path / "day"), "kind": "train"},
                        {"name": "night", "path": str(tmp_path / "night")}], "batch_size": 4}
    t = create("folders", **spec)
    assert [(g.name, g.kind) for g in t] == [("day", "train"), ("night", "adapt")]
    assert t.spec["domains"][1]["kind"] == "adapt"
    # the spec rebuilds the same stream
    u = create("folders", **{k: v for k, v in t.spec.items() if k in ("domains", "batch_size", "seed", "shuffle")})
    assert torch.equal(u.segments[1].materialise("cpu")[1], t.segments[1].materialise("cpu")[1])


def test_folder_errors_before_any_work(tmp_path):
    _write_folder(tmp_path / "ok")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        from_folders([tmp_path / "ok", tmp_path / "empty"])
    with pytest.raises(DataNotFoundError, match="does not exist"):
        from_folders([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="not among"):
        from_folders([tmp_path / "ok"], classes=["cat"])
    with pytest.raises(ConfigError, match="unknown keys"):
        create("folders", domains=[{"path": str(tmp_path / "ok"), "typ": "adapt"}])


def test_npz_domain(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((5, 4, 4, 3), np.uint8), labels=np.arange(5))
    s = create("folders", domains=[{"name": "arr", "path": str(tmp_path / "d.npz"), "kind": "eval"}])
    assert s.segments[0].num_samples == 5 and s.segments[0].kind == "eval"


def test_avalanche_round_trip_keeps_classes_and_counts():
    from ctta.streams import from_avalanche, to_avalanche

    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(5)
    train = ImageSet(torch.randint(0, 256, (30, 3, 4, 4), generator=g, dtype=torch.uint8), y, list("abcdef"))
    test = ImageSet(train.images[::5].clone(), y[::5].clone(), list("abcdef"))
    s = class_incremental_stream("ci", train, test, init_classes=2, increment=2, seed=1)
    bench = to_avalanche(s)
    sessions = [seg for seg in s if seg.kind == "train"]
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == \
        [sorted(seg.meta["classes"]) for seg in sessions]
    back = from_avalanche(bench, batch_size=4)
    assert back.setting == "class_incremental" and back.num_classes == 6
    got = [seg for seg in back if seg.kind == "train"]
    assert [sorted(seg.meta["classes"]) for seg in got] == [sorted(seg.meta["classes"]) for seg in sessions]
    assert [seg.num_samples for seg in got] == [seg.num_samples for seg in sessions]
    last = back.segments[-1]
    assert last.groups == ["session-0", "session-1", "session-2"] and last.num_samples == 6
    assert last.meta["after"] == "session-2"
