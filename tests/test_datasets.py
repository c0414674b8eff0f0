"""Loading clean CIFAR sets (.npz file or folder, torchvision layout) and -C files, on tiny data written here."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ctta.errors import ConfigError, DataNotFoundError
from ctta.streams.datasets import CIFAR10_CLASSES, ImageSet, load_cifar, load_corrupted

SHARED_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "test.npz"


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_npz(path: Path, n: int = 12, classes: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = _images(n, seed), np.arange(n) % 10
    arrays = {"images": x, "labels": y.astype(np.uint8)}
    if classes:
        arrays["classes"] = np.array([f"c{i}" for i in range(10)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return x, y


def _assert_same(s: ImageSet, x: np.ndarray, y: np.ndarray) -> None:
    assert s.images.dtype == torch.uint8 and s.images.shape == (len(x), 3, 32, 32)
    assert s.labels.dtype == torch.int64
    assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), x)
    assert np.array_equal(s.labels.numpy(), y)


def _write_torchvision_cifar10(root: Path, n: int = 6, train: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 python format: pickled dicts, ``data`` rows of 3072 bytes (R, G, B planes), ``labels``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for k, fname in enumerate(names):
        x, y = _images(n, seed=k), [(i + k) % 10 for i in range(n)]
        with open(folder / fname, "wb") as f:
            pickle.dump({"batch_label": fname, "data": x.transpose(0, 3, 1, 2).reshape(n, 3072),
                         "labels": y, "filenames": [f"{i}.png" for i in range(n)]}, f)
        xs.append(x)
        ys.append(np.array(y))
    return np.concatenate(xs), np.concatenate(ys)


# ---- .npz ---------------------------------------------------------------------------------------------------------

def test_npz_file(tmp_path):
    x, y = _write_npz(tmp_path / "anything.npz")
    s = load_cifar("cifar10", tmp_path / "anything.npz")
    _assert_same(s, x, y)
    assert s.classes == [f"c{i}" for i in range(10)] and len(s) == 12


@pytest.mark.parametrize("fname, train", [("test.npz", False), ("cifar10_test.npz", False), ("train.npz", True)])
def test_npz_in_a_folder(tmp_path, fname, train):
    x, y = _write_npz(tmp_path / fname)
    _write_npz(tmp_path / ("test_other.npz"), seed=9)  # not a candidate name: ignored
    _assert_same(load_cifar("cifar10", tmp_path, train=train), x, y)


def test_npz_without_classes_gets_the_cifar10_names(tmp_path):
    _write_npz(tmp_path / "test.npz", classes=False)
    assert load_cifar("cifar10", str(tmp_path)).classes == list(CIFAR10_CLASSES)


def test_npz_of_the_wrong_dataset_or_shape_is_a_config_error(tmp_path):
    _write_npz(tmp_path / "test.npz")
    with pytest.raises(ConfigError, match="10 classes, but cifar100 has 100"):
        load_cifar("cifar100", tmp_path)
    np.savez(tmp_path / "bad.npz", images=_images(2), targets=np.zeros(2))
    with pytest.raises(ConfigError, match="missing labels"):
        load_cifar("cifar10", tmp_path / "bad.npz")
    np.savez(tmp_path / "nchw.npz", images=_images(2).transpose(0, 3, 1, 2).copy()[:, :, :, :2], labels=[0, 1])
    with pytest.raises(ConfigError, match="uint8 N x H x W x 3"):
        load_cifar("cifar10", tmp_path / "nchw.npz")
    with pytest.raises(ConfigError, match="dataset must be one of"):
        load_cifar("svhn", tmp_path)


# ---- torchvision layout -------------------------------------------------------------------------------------------

def test_torchvision_folder_test_split(tmp_path):
    x, y = _write_torchvision_cifar10(tmp_path)
    s = load_cifar("cifar10", tmp_path)
    _assert_same(s, x, y)
    assert s.classes == list(CIFAR10_CLASSES)
    _assert_same(load_cifar("cifar10", tmp_path / "cifar-10-batches-py"), x, y)  # the inner folder itself


def test_torchvision_folder_train_split(tmp_path):
    x, y = _write_torchvision_cifar10(tmp_path, n=3, train=True)
    _assert_same(load_cifar("cifar10", tmp_path, train=True), x, y)


def test_torchvision_cifar100_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _images(4)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(4, -1), "fine_labels": [99, 0, 5, 7],
                     "coarse_labels": [0, 0, 1, 1]}, f)
    s = load_cifar("cifar100", tmp_path)
    _assert_same(s, x, np.array([99, 0, 5, 7]))
    assert len(s.classes) == 100 and s.classes[99] == "f99"


def test_incomplete_torchvision_folder(tmp_path):
    _write_torchvision_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match="incomplete cifar10 folder: missing data_batch_1"):
        load_cifar("cifar10", tmp_path, train=True)


# ---- missing data and download ------------------------------------------------------------------------------------

def test_missing_data_names_the_folder_and_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "test.npz" in msg and "cifar-10-batches-py" in msg
    assert "--download" in msg and "--data-root" in msg and "\n" not in msg
    with pytest.raises(DataNotFoundError, match="no such folder"):
        load_cifar("cifar100", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_cifar("cifar10", tmp_path / "missing.npz")


def test_offline_download_is_a_data_not_found_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataNotFoundError, match=f"could not download cifar10 into {tmp_path}.*URLError"):
        load_cifar("cifar10", tmp_path, download=True)


def test_download_then_load(tmp_path, monkeypatch):
    import torchvision.datasets

    written = {}

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert download
            written["xy"] = _write_torchvision_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    s = load_cifar("cifar10", tmp_path / "new", download=True)
    _assert_same(s, *written["xy"])


# ---- CIFAR-10-C files ---------------------------------------------------------------------------------------------

def _write_c(folder: Path, n: int = 4, stacked_labels: bool = True) -> None:
    """A -C file whose severity s has every pixel equal to 10 s, and labels 0..n-1 per severity."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = np.concatenate([np.full((n, 32, 32, 3), 10 * s, np.uint8) for s in range(1, 6)])
    np.save(folder / "gaussian_noise.npy", stack)
    labels = np.tile(np.arange(n), 5 if stacked_labels else 1).astype(np.uint8)
    np.save(folder / "labels.npy", labels)


@pytest.mark.parametrize("where", ["data_folder", "npz_file", "c_folder"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_c_files_give_the_right_severity_slice(tmp_path, where, severity):
    _write_npz(tmp_path / "test.npz")
    _write_c(tmp_path / "CIFAR-10-C")
    root = {"data_folder": tmp_path, "npz_file": tmp_path / "test.npz", "c_folder": tmp_path / "CIFAR-10-C"}[where]
    s = load_corrupted("cifar10", root, "gaussian_noise", severity)
    assert s is not None and s.images.shape == (4, 3, 32, 32) and s.images.dtype == torch.uint8
    assert (s.images == 10 * severity).all()
    assert s.labels.tolist() == [0, 1, 2, 3] and s.classes == list(CIFAR10_CLASSES)


def test_c_labels_of_one_severity_are_accepted(tmp_path):
    _write_c(tmp_path / "CIFAR-10-C", stacked_labels=False)
    s = load_corrupted("cifar10", tmp_path, "gaussian_noise", 2)
    assert (s.images == 20).all() and s.labels.tolist() == [0, 1, 2, 3]


def test_absent_c_files_give_none(tmp_path):
    _write_npz(tmp_path / "test.npz")
    assert load_corrupted("cifar10", tmp_path, "gaussian_noise", 5) is None
    assert load_corrupted("cifar10", tmp_path / "test.npz", "gaussian_noise", 5) is None
    _write_c(tmp_path / "CIFAR-10-C")
    assert load_corrupted("cifar10", tmp_path, "fog", 5) is None  # only some corruptions present
    assert load_corrupted("cifar100", tmp_path, "gaussian_noise", 5) is None  # CIFAR-100-C is another folder


def test_bad_c_requests(tmp_path):
    _write_c(tmp_path / "CIFAR-10-C")
    with pytest.raises(ConfigError, match="severity must be an integer from 1 to 5"):
        load_corrupted("cifar10", tmp_path, "gaussian_noise", 6)
    (tmp_path / "CIFAR-10-C" / "labels.npy").unlink()
    with pytest.raises(DataNotFoundError, match="no labels.npy"):
        load_corrupted("cifar10", tmp_path, "gaussian_noise", 1)


# ---- ImageSet -----------------------------------------------------------------------------------------------------

def test_imageset_helpers():
    s = ImageSet(torch.from_numpy(_images(5).transpose(0, 3, 1, 2).copy()), torch.arange(5), ["a", "b"])
    sub = s.subset([4, 0])
    assert len(sub) == 2 and sub.labels.tolist() == [4, 0] and torch.equal(sub.images[1], s.images[0])
    assert len(s.subset(torch.tensor([1, 2, 3]))) == 3 and len(s.subset(slice(0, 2))) == 2
    f = s.float()
    assert f.dtype == torch.float32 and f.min() >= 0 and f.max() <= 1
    assert torch.allclose(f * 255, s.images.float())
    assert s.to("cpu").images.device.type == "cpu"
    with pytest.raises(ConfigError, match="N labels"):
        ImageSet(s.images, torch.arange(4), ["a"])


# ---- the shared CIFAR-10 test set ----------------------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_TEST.is_file(), reason=f"{SHARED_TEST} is absent")
def test_shared_cifar10_test_set():
    s = load_cifar("cifar10", SHARED_TEST)
    assert len(s) == 10000 and s.images.shape == (10000, 3, 32, 32)
    assert len(s.classes) == 10 and s.classes[0] == "airplane"
    assert sorted(s.labels.unique().tolist()) == list(range(10))
    assert len(load_cifar("cifar10", SHARED_TEST.parent)) == 10000


# ---- JPEG-bytes .npz (the shared train_jpeg.npz format), image folders, ImageNet-C layout ------------------------

def _write_jpeg_npz(path: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    import io

    from PIL import Image

    x = np.broadcast_to((np.arange(n) * 40 + 10).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
    x[:, :, :, 1] //= 2  # flat colours: JPEG keeps them within a grey level or two
    y = np.arange(n) % 10
    blobs = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=y.astype(np.uint8),
             classes=np.array(CIFAR10_CLASSES))
    return x, y


def test_train_jpeg_npz_is_decoded_once_and_cached_outside_the_data_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    x, y = _write_jpeg_npz(data / "train_jpeg.npz")
    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path / "cache"))
    s = load_cifar("cifar10", data, train=True)
    assert s.images.shape == (6, 3, 32, 32) and np.array_equal(s.labels.numpy(), y)
    assert np.abs(s.images.permute(0, 2, 3, 1).numpy().astype(int) - x).max() <= 3  # JPEG-decoded
    cached = list((tmp_path / "cache" / "decoded").glob("*.npy"))
    assert len(cached) == 1 and sorted(p.name for p in data.iterdir()) == ["train_jpeg.npz"]
    again = load_cifar("cifar10", data, train=True)  # from the cache
    assert torch.equal(again.images, s.images)


def _write_png_tree(root: Path, classes=("n01", "n02"), per_class: int = 3, size: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_and_imagenet_c_layout(tmp_path):
    from ctta.streams.datasets import load_image_folder, load_imagenet_c

    _write_png_tree(tmp_path / "gaussian_noise" / "3")
    with pytest.raises(ConfigError, match="sizes"):
        load_image_folder(tmp_path / "gaussian_noise" / "3")
    s = load_imagenet_c(tmp_path, "gaussian_noise", 3, size=6, max_per_class=2)
    assert s.images.shape == (4, 3, 6, 6) and s.labels.tolist() == [0, 0, 1, 1] and s.classes == ["n01", "n02"]
    s2 = load_image_folder(tmp_path / "gaussian_noise" / "3", classes=["x", "n02", "n01"], size=8)
    assert sorted(s2.labels.tolist()) == [1, 1, 1, 2, 2, 2] and len(s2.classes) == 3
    with pytest.raises(DataNotFoundError, match="no ImageNet-C folder"):
        load_imagenet_c(tmp_path, "fog", 3)
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        load_image_folder(tmp_path / "empty")


@pytest.mark.skipif(not (SHARED_TEST.parent / "train_jpeg.npz").is_file(), reason="shared CIFAR-10 train set absent")
@pytest.mark.slow
def test_shared_cifar10_train_jpeg(tmp_path, monkeypatch):
    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path))
    s = load_cifar("cifar10", SHARED_TEST.parent, train=True)
    assert s.images.shape == (50000, 3, 32, 32) and s.labels.bincount().tolist() == [5000] * 10


# ---- truncated and misplaced files: one-line errors ------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_npz_is_a_one_line_config_error(tmp_path, compressed):
    x, y = _images(12), np.arange(12) % 10
    (np.savez_compressed if compressed else np.savez)(tmp_path / "test.npz", images=x, labels=y)
    data = (tmp_path / "test.npz").read_bytes()
    (tmp_path / "test.npz").write_bytes(data[:len(data) // 2])
    for root in (tmp_path, tmp_path / "test.npz"):
        with pytest.raises(ConfigError, match="test.npz: not a readable .npz file") as e:
            load_cifar("cifar10", root)
        assert "\n" not in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("which", ["gaussian_noise.npy", "labels.npy"])
@pytest.mark.parametrize("keep", [20, 0.5])
def test_truncated_c_file_is_a_one_line_config_error_naming_it(tmp_path, which, keep):
    from ctta.streams.datasets import load_c_labels

    _write_c(tmp_path / "CIFAR-10-C")
    f = tmp_path / "CIFAR-10-C" / which
    data = f.read_bytes()
    f.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    for load in (lambda: load_corrupted("cifar10", tmp_path, "gaussian_noise", 2),
                 lambda: load_c_labels("cifar10", tmp_path, "gaussian_noise")):
        with pytest.raises(ConfigError, match=f"{which}: not a readable .npy file") as e:
            load()
        assert "\n" not in str(e.value)


def test_c_file_records_its_path_and_a_cifar10_c_folder_is_no_cifar100_c_release(tmp_path):
    from ctta.streams.datasets import c_release_folder, corrupted_file, load_c_labels

    _write_c(tmp_path / "CIFAR-10-C")
    s = load_corrupted("cifar10", tmp_path, "gaussian_noise", 1)
    assert s.source == str(tmp_path / "CIFAR-10-C" / "gaussian_noise.npy")
    labels = load_c_labels("cifar10", tmp_path / "CIFAR-10-C", "gaussian_noise")
    assert labels.labels.tolist() == [0, 1, 2, 3] and labels.images.shape == (4, 3, 0, 0)
    assert c_release_folder("cifar10", tmp_path) == c_release_folder("cifar10", tmp_path / "CIFAR-10-C") \
        == tmp_path / "CIFAR-10-C"
    assert corrupted_file("cifar10", tmp_path, "fog") is None
    # pointing at CIFAR-10-C itself must not serve its files as CIFAR-100-C
    assert c_release_folder("cifar100", tmp_path / "CIFAR-10-C") is None
    assert load_corrupted("cifar100", tmp_path / "CIFAR-10-C", "gaussian_noise", 1) is None
