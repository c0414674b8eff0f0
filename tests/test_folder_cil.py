"""Folder-based CIL streams on tiny trees built in tmp: ImageNet-R (PILOT's train/test folders and the seeded 80:20
split), CUB-200 (the official release's split files), CUB-200 and miniImageNet FSCIL from TOPIC / CEC index lists,
PILOT's class order, and one-line errors for missing data and index lines that match no image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ctta
from ctta.errors import ConfigError, DataNotFoundError
from ctta.streams.folder_cil import pilot_order

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value % 256, dtype=np.uint8)).save(path)


def _sessions(stream):
    return [s for s in stream.segments if s.kind == "train"]


def test_imagenet_r_ci_reads_pilot_train_test_folders_and_pilot_order(tmp_path):
    root = tmp_path / "imagenet-r"
    wnids = [f"n{i:08d}" for i in range(200)]
    for i, w in enumerate(wnids):
        for j in range(2):
            _png(root / "train" / w / f"{j}.png", i)
        _png(root / "test" / w / "0.png", i)
    s = ctta.streams.create("imagenet_r_ci", data_root=str(tmp_path), class_order="pilot")
    sessions = _sessions(s)
    assert len(sessions) == 10 and all(seg.num_samples == 40 for seg in sessions)
    assert s.spec["split"] == "released" and s.spec["class_order"] == pilot_order(200)
    assert pilot_order(200) == np.random.RandomState(1993).permutation(200).tolist()
    assert sessions[0].meta["classes"] == pilot_order(200)[:20]
    last_eval = [seg for seg in s.segments if seg.kind == "eval"][-1]
    assert last_eval.num_samples == 200


def test_imagenet_r_ci_splits_the_release_80_20_per_class_by_the_seed(tmp_path):
    root = tmp_path / "imagenet-r"
    for i in range(200):
        for j in range(5):
            _png(root / f"n{i:08d}" / f"{j}.png", i)
    a = ctta.streams.create("imagenet_r_ci", data_root=str(tmp_path), seed=3)
    b = ctta.streams.create("imagenet_r_ci", data_root=str(tmp_path), seed=3)
    assert a.spec["split"] == "seeded"
    assert sum(seg.num_samples for seg in _sessions(a)) == 200 * 4  # 4 train + 1 test per class
    x, y = _sessions(a)[0].load(torch.device("cpu"))
    x2, y2 = _sessions(b)[0].load(torch.device("cpu"))
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape[1:] == (3, 224, 224)


def _cub_release(tmp_path: Path, train_per_class, test_per_class=1) -> Path:
    rel = tmp_path / "CUB_200_2011"
    images, split, labels, classes = [], [], [], []
    k = 0
    for c in range(200):
        folder = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {folder}")
        for j in range(train_per_class(c) + test_per_class):
            k += 1
            name = f"{folder}/Bird_{c}_{j:04d}.png"
            _png(rel / "images" / name, c)
            images.append(f"{k} {name}")
            split.append(f"{k} {1 if j < train_per_class(c) else 0}")
            labels.append(f"{k} {c + 1}")
    for fname, lines in (("images.txt", images), ("train_test_split.txt", split),
                         ("image_class_labels.txt", labels), ("classes.txt", classes)):
        (rel / fname).write_text("\n".join(lines) + "\n")
    return rel


def test_cub200_ci_uses_the_release_train_test_split(tmp_path):
    _cub_release(tmp_path, lambda c: 2)
    s = ctta.streams.create("cub200_ci", data_root=str(tmp_path), init_classes=100, increment=100)
    train, evals = _sessions(s), [seg for seg in s.segments if seg.kind == "eval"]
    assert [seg.num_samples for seg in train] == [200, 200] and evals[-1].num_samples == 200
    assert s.spec["split"] == "released"


def test_cub200_fscil_takes_the_few_shot_images_of_the_index_list(tmp_path):
    rel = _cub_release(tmp_path, lambda c: 7 if 100 <= c < 110 else 1)
    chosen = [f"CUB_200_2011/images/{c + 1:03d}.Bird_{c}/Bird_{c}_{j:04d}.png" for c in range(100, 110)
              for j in (6, 4, 2, 1, 0)]
    index = tmp_path / "index_list"
    index.mkdir()
    (index / "session_1.txt").write_text("")
    (index / "session_2.txt").write_text("\n".join(chosen) + "\n")
    s = ctta.streams.create("cub200_fscil", data_root=str(tmp_path), num_sessions=2, index_list=str(index))
    base, fewshot = _sessions(s)
    assert base.num_samples == 100 and fewshot.num_samples == 50
    picked = s.spec["fewshot_indices"][0]
    files = [str(p) for p in ctta.streams.folder_cil.load_cub(tmp_path)[0].images.files]
    assert sorted(files[i].split("images/")[1] for i in picked) == sorted(c.split("images/")[1] for c in chosen)
    (index / "session_2.txt").write_text("CUB_200_2011/images/101.Bird_100/missing.png\n")
    with pytest.raises(ConfigError, match="not in the train data"):
        ctta.streams.create("cub200_fscil", data_root=str(tmp_path), num_sessions=2, index_list=str(index))
    assert rel.is_dir()


def test_miniimagenet_fscil_reads_cec_csv_splits_and_labels_by_first_appearance(tmp_path):
    root = tmp_path / "miniimagenet"
    wnids = [f"n{9000 - i:08d}" for i in range(100)]  # first-appearance order differs from sorted order
    train, test = ["filename,label"], ["filename,label"]
    for i, w in enumerate(wnids):
        for j in range(6):
            _png(root / "images" / f"{w}{j:08d}.jpg", i)
            train.append(f"{w}{j:08d}.jpg,{w}")
        _png(root / "images" / f"{w}{99:08d}.jpg", i)
        test.append(f"{w}{99:08d}.jpg,{w}")
    (root / "split").mkdir()
    (root / "split" / "train.csv").write_text("\n".join(train) + "\n")
    (root / "split" / "test.csv").write_text("\n".join(test) + "\n")
    s = ctta.streams.create("miniimagenet_fscil", data_root=str(tmp_path), num_sessions=3)
    base, *few = _sessions(s)
    assert base.num_samples == 60 * 6 and [f.num_samples for f in few] == [25, 25]
    assert few[0].meta["classes"] == [60, 61, 62, 63, 64]
    x, y = few[0].load(torch.device("cpu"))
    assert x.shape[1:] == (3, 84, 84) and sorted(set(y.tolist())) == [60, 61, 62, 63, 64]
    # the label is the wnid's first appearance in train.csv: class 60 is wnids[60], whose images are all value 60
    assert torch.allclose(x[y == 60].mean(), torch.tensor(60 / 255), atol=1e-3)


def test_missing_folder_cil_data_says_what_to_get(tmp_path):
    with pytest.raises(DataNotFoundError, match="CUB_200_2011"):
        ctta.streams.create("cub200_ci", data_root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="imagenet-r"):
        ctta.streams.create("imagenet_r_ci", data_root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="split/train.csv"):
        ctta.streams.create("miniimagenet_fscil", data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="class_order"):
        ctta.streams.create("cub200_ci", data_root=str(tmp_path), class_order="random")
