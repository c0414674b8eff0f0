"""Image files decoded on demand: the lazy image source of the benchmark-scale streams (ImageNet-C and relatives).

A :class:`FileImages` is indexed like a uint8 N x 3 x S x S tensor but holds only paths; ``images[rows]`` decodes
those rows (PIL in a thread pool: decoding and resizing release the GIL) with ImageNet's evaluation preprocessing,
torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` as ``make_imagenet_c.py`` and RobustBench apply it. A
stream over 50 000 files therefore costs a list of paths until a chunk is fetched (:mod:`.gather`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError, DataNotFoundError

def default_workers() -> int:
    """Decoding threads when a stream does not say: the cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class LazyImages:
    """Images decoded on indexing: ``images[rows]`` is uint8 len(rows) x 3 x ``crop`` x ``crop`` on the host, in the
    order asked, decoded by ``workers`` threads (PIL decodes and resizes without the GIL). Subclasses say how to
    get one row (:meth:`image`)."""

    crop: int = 224
    workers: int = 1

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self), 3, self.crop, self.crop)

    def dim(self) -> int:
        return 4

    def image(self, row: int) -> np.ndarray:
        """Row ``row`` as uint8 crop x crop x 3 (called from several threads)."""
        raise NotImplementedError

    def open(self) -> None:
        """Called before the threads of an index call start (e.g. to open a file they share)."""

    def __getitem__(self, rows: Union[Tensor, Sequence[int], slice]) -> Tensor:
        if isinstance(rows, slice):
            idx = list(range(len(self)))[rows]
        elif isinstance(rows, Tensor):
            idx = rows.reshape(-1).tolist()
        else:
            idx = list(rows)
        out = np.empty((len(idx), self.crop, self.crop, 3), dtype=np.uint8)
        self.open()

        def one(k: int) -> None:
            out[k] = self.image(idx[k])

        if len(idx) > 1 and self.workers > 1:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(idx))) as pool:
                list(pool.map(one, range(len(idx))))
        else:
            for k in range(len(idx)):
                one(k)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _decoded(source: Any, what: str, prepare: Callable[[Any], Any]) -> np.ndarray:
    """``prepare(PIL RGB image)`` of an image file or stream as an array; one-line errors for gone or bad files."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            return np.asarray(prepare(im.convert("RGB")))
    except FileNotFoundError:
        raise DataNotFoundError(f"{what}: the image file is gone (was the data folder moved?)") from None
    except OSError as e:
        raise ConfigError(f"{what}: not a readable image ({e})") from None


class FileImages(LazyImages):
    """Paths of images, decoded on indexing into uint8 N x 3 x ``crop`` x ``crop`` (what a tensor source gives).

    ``resize`` (the shorter side, bilinear, as torchvision's ``Resize``) then a centre crop of ``crop``; without
    ``resize`` an image is only centre-cropped (resized first when smaller than ``crop``), which keeps released
    224 x 224 ImageNet-C files as they are. ``workers`` threads decode one index call.

    With ``random_crop_seed`` (CCC's sampling) row ``r`` is file ``r % len(files)`` under a random horizontal flip
    and ``RandomResizedCrop(crop)`` drawn from (seed, r): the same row always gives the same image, so one file seen
    at two points of a stream (rows ``k * len(files) + i``) gets two crops, reproducibly.
    """

    def __init__(self, files: Sequence[Union[str, Path]], crop: int = 224, resize: Optional[int] = None,
                 workers: Optional[int] = None, random_crop_seed: Optional[int] = None) -> None:
        for name, v in (("crop", crop), ("resize", resize), ("workers", workers)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self.files: List[Path] = [Path(f) for f in files]
        self.crop, self.resize = crop, resize
        self.workers = workers or default_workers()
        self.random_crop_seed = random_crop_seed

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FileImages({len(self.files)} files, resize={self.resize}, crop={self.crop})"

    def subset(self, rows: Union[Tensor, Sequence[int]]) -> "FileImages":
        """The files at ``rows``, nothing decoded."""
        idx = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        return FileImages([self.files[i] for i in idx], self.crop, self.resize, self.workers)

    def image(self, row: int) -> np.ndarray:
        return self.decode(self.files[row]) if self.random_crop_seed is None else self.decode_random(row)

    def decode(self, path: Path) -> np.ndarray:
        """One file as uint8 crop x crop x 3 after the preprocessing."""
        return _decoded(path, str(path), lambda im: centre_crop(im, self.crop, self.resize))

    def decode_random(self, row: int) -> np.ndarray:
        """Row ``row`` as CCC's generator makes it: ``RandomHorizontalFlip()`` then ``RandomResizedCrop(crop)``
        (scale 0.08-1, ratio 3/4-4/3, bilinear), the draws seeded by (seed, row) instead of the global RNG."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        rng = np.random.default_rng([int(self.random_crop_seed), int(row)])
        path = self.files[row % len(self.files)]

        def prepare(im: Any) -> Any:
            if rng.random() < 0.5:
                im = F.hflip(im)
            top, left, h, w = resized_crop_box(im.size[1], im.size[0], rng)
            return F.resized_crop(im, top, left, h, w, [self.crop, self.crop], interpolation=InterpolationMode.BILINEAR)

        return _decoded(path, str(path), prepare)


def centre_crop(im: Any, crop: int, resize: Optional[int] = None) -> Any:
    """torchvision's ``Resize(resize)`` (bilinear, shorter side) then ``CenterCrop(crop)`` on a PIL image; without
    ``resize`` only the crop (after resizing to ``crop`` when smaller)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    if resize is not None:
        im = F.resize(im, resize, interpolation=InterpolationMode.BILINEAR)
    elif min(im.size) < crop:
        im = F.resize(im, crop, interpolation=InterpolationMode.BILINEAR)
    return im if im.size == (crop, crop) else F.center_crop(im, crop)


class TarImages(LazyImages):
    """The JPEG members of a tar file (a webdataset shard such as CCC's ``serial_00000.tar``), decoded on indexing.

    ``offsets`` / ``sizes`` locate each image's bytes (see :func:`index_shard`); reads use ``os.pread`` on one open
    file shared by the decoding threads. Images are centre-cropped to ``crop`` when not that size already.
    """

    def __init__(self, path: Union[str, Path], offsets: Sequence[int], sizes: Sequence[int], crop: int = 224,
                 workers: Optional[int] = None) -> None:
        self.path = Path(path)
        self.offsets, self.sizes = list(offsets), list(sizes)
        self.crop = crop
        self.workers = workers or default_workers()
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)

    def image(self, row: int) -> np.ndarray:
        import io

        data = os.pread(self._fd, self.sizes[row], self.offsets[row])
        return _decoded(io.BytesIO(data), f"{self.path} (image {row})", lambda im: centre_crop(im, self.crop))


def index_shard(path: Union[str, Path], image_ext: str = "input.jpg",
                label_ext: str = "output.cls") -> Tuple[List[int], List[int], List[int]]:
    """Byte offsets, sizes and integer labels of the samples of a webdataset tar, in the tar's order (members
    ``<key>.<image_ext>`` and ``<key>.<label_ext>``, the label as text); one pass over its headers."""
    import tarfile

    entries: dict = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = Path(m.name).name.partition(".")
                e = entries.setdefault(key, {})
                if ext == image_ext:
                    e["offset"], e["size"] = m.offset_data, m.size
                elif ext == label_ext:
                    e["label"] = int(tf.extractfile(m).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable webdataset shard ({type(e).__name__}: {e})") from None
    done = [e for e in entries.values() if "offset" in e and "label" in e]
    if not done:
        raise ConfigError(f"{path}: no samples with both .{image_ext} and .{label_ext} members")
    return [e["offset"] for e in done], [e["size"] for e in done], [e["label"] for e in done]


def resized_crop_box(height: int, width: int, rng: np.random.Generator, scale: Tuple[float, float] = (0.08, 1.0),
                     ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, torchvision's ``RandomResizedCrop.get_params`` rule (ten tries
    at a random area and log-uniform aspect ratio, else the centre crop at the nearest allowed ratio) on ``rng``."""
    import math

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def class_folder_files(root: Path, classes: Sequence[str], what: str) -> Tuple[List[Path], List[int], List[str]]:
    """Images of a ``<root>/<wnid>/<file>`` tree, sorted by (folder, name); labels index ``classes`` (ImageNet's
    wnids); a folder that is not one of them is a one-line error (:func:`~.datasets.list_class_folders`)."""
    from .datasets import list_class_folders

    return list_class_folders(root, classes, what=f"{what}:", kind="ImageNet class ids (wnids)")
