"""Clean CIFAR test/train sets, the released CIFAR-10-C / CIFAR-100-C files and image folders, as uint8 tensors.

Where the data may be (``root``): an ``.npz`` file with ``images`` (uint8 N x H x W x 3) and ``labels`` (optional
``classes``), or with ``jpeg`` (JPEG files back to back), ``offsets`` and ``labels`` (decoded once with PIL and
cached under :func:`cache_dir`); a folder holding such a file (``test.npz`` / ``train.npz`` / ``train_jpeg.npz`` or ``<name>_test.npz``); or a folder in
torchvision's layout (``cifar-10-batches-py`` / ``cifar-100-python``), which torchvision downloads on request.
The batch files are read here (the CIFAR python pickle format) rather than through ``torchvision.datasets`` so
that a partial or re-packed folder loads without torchvision's whole-archive checksum test.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError, CttaError, DataNotFoundError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
DatasetName = Literal["cifar10", "cifar100"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SEVERITIES = 5

# torchvision's folder names and files (torchvision.datasets.CIFAR10 / CIFAR100)
_TV_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TV_TRAIN = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}
_TV_TEST = {"cifar10": ("test_batch",), "cifar100": ("test",)}
_TV_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
_C_FOLDER = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}

# what a malformed or truncated .npy / .npz raises: header and mmap errors, a cut zip (BadZipFile), bad deflate data
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)

_HOW_TO_GET = ("pass --download when online, or point --data-root at a torchvision CIFAR folder or an .npz file "
               "with 'images' (uint8 N x H x W x 3) and 'labels'")


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x H x W), their int64 labels and the class names: a dataset held in memory, or image
    files decoded on demand (:class:`~ctta.streams.files.FileImages`, indexed the same way)."""

    images: Tensor
    labels: Tensor
    classes: List[str]
    source: Optional[str] = None  # the file the images were read from, when one (a -C file: its provenance)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ConfigError(f"an image set needs N x C x H x W images and N labels, got images of shape "
                              f"{tuple(self.images.shape)} and {tuple(self.labels.shape)} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Union[Tensor, Sequence[int], slice]) -> "ImageSet":
        """The images at ``indices`` (a tensor, a list or a slice), same classes."""
        if not isinstance(indices, (Tensor, slice)):
            indices = torch.as_tensor(list(indices), dtype=torch.long)
        if not isinstance(self.images, Tensor):  # files decoded on demand (streams.files.FileImages)
            rows = torch.arange(len(self))[indices]
            return ImageSet(self.images.subset(rows), self.labels[rows], list(self.classes))
        return ImageSet(self.images[indices], self.labels[indices], list(self.classes))

    def to(self, device: Union[str, torch.device]) -> "ImageSet":
        """The same set with its tensors on ``device``."""
        return ImageSet(self.images.to(device), self.labels.to(device), list(self.classes))

    def float(self) -> Tensor:
        """Images as float32 in [0, 1], the input range of the corruptions and the models."""
        return self.images.float().div_(255.0) if self.images.dtype == torch.uint8 else self.images.float()


def default_data_root() -> Path:
    """``$CTTA_BENCH_DATA``, else ``$XDG_CACHE_HOME/ctta-bench/data``, else ``~/.cache/ctta-bench/data``."""
    if os.environ.get("CTTA_BENCH_DATA"):
        return Path(os.environ["CTTA_BENCH_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctta-bench" / "data"


def _check_name(name: str) -> str:
    if name not in NUM_CLASSES:
        raise ConfigError(f"dataset must be one of {', '.join(NUM_CLASSES)}, got {name!r}")
    return name


def _default_classes(name: str) -> List[str]:
    return list(CIFAR10_CLASSES) if name == "cifar10" else [str(i) for i in range(NUM_CLASSES[name])]


def _to_imageset(images: np.ndarray, labels: np.ndarray, classes: Optional[Sequence[str]], name: str,
                 source: Path) -> ImageSet:
    """Check and convert NHWC uint8 images and labels read from ``source`` into an :class:`ImageSet`."""
    images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{source}: 'images' must be uint8 N x H x W x 3, got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise ConfigError(f"{source}: 'images' must be uint8 (0..255), got dtype {images.dtype}")
        images = images.astype(np.uint8)
    if labels.shape[0] != images.shape[0]:
        raise ConfigError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels")
    classes = [str(c) for c in classes] if classes is not None else _default_classes(name)
    n_cls = NUM_CLASSES[name]
    if len(classes) != n_cls:
        raise ConfigError(f"{source}: {len(classes)} classes, but {name} has {n_cls}; is this the right dataset?")
    if labels.size and (labels.min() < 0 or labels.max() >= n_cls):
        raise ConfigError(f"{source}: labels must lie in 0..{n_cls - 1}, got {labels.min()}..{labels.max()}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(images=x, labels=y, classes=classes)


def _load_npz(path: Path, name: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "jpeg" in data.files and "offsets" in data.files:
                classes = data["classes"].tolist() if "classes" in data.files else None
                labels = data["labels"]
                images = _decoded_jpeg_npz(path, data)
                log.info("loaded %s from %s (%d JPEG-decoded images)", name, path, len(labels))
                return _to_imageset(images, labels, classes, name, path)
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise ConfigError(f"{path}: an .npz data set needs arrays 'images' and 'labels'; missing "
                                  f"{', '.join(missing)} (has: {', '.join(data.files) or 'none'})")
            classes = data["classes"].tolist() if "classes" in data.files else None
            images, labels = data["images"], data["labels"]
    except CttaError:  # a ConfigError is a ValueError: keep the message of a check above as it is
        raise
    except _READ_ERRORS as e:
        raise ConfigError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); is it truncated? "
                          f"download or copy it again") from None
    log.info("loaded %s from %s (%d images)", name, path, len(labels))
    return _to_imageset(images, labels, classes, name, path)


def cache_dir() -> Path:
    """``$CTTA_BENCH_CACHE``, else ``$XDG_CACHE_HOME/ctta-bench``, else ``~/.cache/ctta-bench``: decoded data, models."""
    if os.environ.get("CTTA_BENCH_CACHE"):
        return Path(os.environ["CTTA_BENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctta-bench"


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, source: Path) -> np.ndarray:
    """Decode JPEG files stored back to back (image i is ``blob[offsets[i]:offsets[i + 1]]``) to uint8 N x H x W x 3."""
    import io

    from PIL import Image

    n = len(offsets) - 1
    out: Optional[np.ndarray] = None
    for i in range(n):
        try:
            with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for a corrupt file
            raise ConfigError(f"{source}: image {i} is not a readable JPEG ({type(e).__name__}: {e})") from None
        if out is None:
            out = np.empty((n,) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ConfigError(f"{source}: image {i} has shape {arr.shape}, the first had {out.shape[1:]}")
        out[i] = arr
    return out if out is not None else np.zeros((0, 32, 32, 3), dtype=np.uint8)


def _decoded_jpeg_npz(path: Path, data: "np.lib.npyio.NpzFile") -> np.ndarray:
    """The images of a JPEG-bytes .npz (``jpeg`` + ``offsets``), decoded once and cached as .npy under :func:`cache_dir`.

    The cache key is the file's resolved path, size and modification time, so a changed file is decoded again;
    the data folder itself is never written (it may be read-only).
    """
    import hashlib

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{path.stem}-{key}.npy"
    if cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache file %s", cached)
    offsets = np.asarray(data["offsets"], dtype=np.int64)
    images = _decode_jpegs(data["jpeg"], offsets, path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, images)
        os.replace(tmp, cached)
        log.info("decoded %d JPEGs of %s; cached at %s", len(images), path, cached)
    except OSError as e:  # a read-only home is not fatal: decode again next time
        log.warning("could not cache decoded images at %s (%s)", cached, e)
    return images


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _tv_folder(root: Path, name: str) -> Optional[Path]:
    """The torchvision CIFAR folder at or inside ``root``, if it holds the meta file."""
    for folder in (root / _TV_FOLDER[name], root):
        if (folder / _TV_META[name][0]).is_file():
            return folder
    return None


def _load_torchvision_folder(folder: Path, name: str, train: bool) -> ImageSet:
    """Read the CIFAR python pickles (``data``: N x 3072 uint8 rows, channel-major; ``labels``/``fine_labels``)."""
    files = (_TV_TRAIN if train else _TV_TEST)[name]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder} is an incomplete {name} folder: missing {', '.join(missing)}; "
                                f"{_HOW_TO_GET}")
    meta_file, meta_key = _TV_META[name]
    try:
        classes = list(_unpickle(folder / meta_file)[meta_key])
        xs, ys = [], []
        for f in files:
            batch = _unpickle(folder / f)
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"] if "labels" in batch else batch["fine_labels"]))
    except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise ConfigError(f"{folder}: not a readable {name} batch folder ({type(e).__name__}: {e})") from None
    images = np.concatenate(xs).transpose(0, 2, 3, 1)
    log.info("loaded %s %s split from %s (%d images)", name, "train" if train else "test", folder, len(images))
    return _to_imageset(images, np.concatenate(ys), classes, name, folder)


def _download(root: Path, name: str, train: bool) -> Path:
    """Fetch the CIFAR archive into ``root`` with torchvision; any failure (offline, disk) is a DataNotFoundError."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    log.info("downloading %s into %s", name, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=train, download=True)
    except Exception as e:  # urllib, socket, checksum and disk errors all mean: no data here
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataNotFoundError(f"could not download {name} into {root} ({reason}); when offline, point "
                                f"--data-root at a torchvision CIFAR folder or an .npz file") from None
    folder = _tv_folder(root, name)
    if folder is None:
        raise DataNotFoundError(f"downloaded {name} into {root} but found no {_TV_FOLDER[name]} folder there")
    return folder


def _npz_candidates(name: str, train: bool) -> Tuple[str, ...]:
    split = "train" if train else "test"
    return (f"{split}.npz", f"{name}_{split}.npz", f"{split}_jpeg.npz", f"{name}_{split}_jpeg.npz")


def load_cifar(name: DatasetName, root: Optional[PathLike], train: bool = False,
               download: bool = False) -> ImageSet:
    """The CIFAR-10/100 test (or train) split from an .npz file, a folder holding one, or a torchvision folder.

    ``root=None`` means :func:`default_data_root`. With ``download=True`` a missing set is fetched by torchvision.
    """
    _check_name(name)
    root = default_data_root() if root is None else Path(root).expanduser()
    if root.is_file():
        if root.suffix != ".npz":
            raise ConfigError(f"data root {root} is a file but not an .npz file; {_HOW_TO_GET}")
        return _load_npz(root, name)
    if root.is_dir():
        for fname in _npz_candidates(name, train):
            if (root / fname).is_file():
                return _load_npz(root / fname, name)
        folder = _tv_folder(root, name)
        if folder is not None:
            return _load_torchvision_folder(folder, name, train)
    elif root.suffix == ".npz":
        raise DataNotFoundError(f"no {name} data: {root} does not exist; {_HOW_TO_GET}")
    looked = [*_npz_candidates(name, train), f"{_TV_FOLDER[name]}/"]
    if download:
        return _load_torchvision_folder(_download(root, name, train), name, train)
    where = f"in {root}" if root.is_dir() else f"at {root} (no such folder)"
    raise DataNotFoundError(f"no {name} {'train' if train else 'test'} set {where}: looked for "
                            f"{', '.join(looked)}; {_HOW_TO_GET}")


def _c_candidates(root: Path, name: str) -> Tuple[Path, ...]:
    """Where the -C files of ``name`` may be: ``<root>/CIFAR-10-C``, or ``root`` itself unless it is the -C folder
    of the other dataset (a CIFAR-10-C folder is no CIFAR-100-C release)."""
    base = root.parent if root.is_file() else root
    other = {f for n, f in _C_FOLDER.items() if n != name}
    return (base / _C_FOLDER[name],) if base.name in other else (base / _C_FOLDER[name], base)


def _c_folder(root: Path, name: str, corruption: str) -> Optional[Path]:
    """The -C folder (``<root>/CIFAR-10-C`` or ``root`` itself) holding ``<corruption>.npy``, if any."""
    for folder in _c_candidates(root, name):
        if (folder / f"{corruption}.npy").is_file():
            return folder
    return None


def _resolve_root(root: Optional[PathLike]) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _check_corruption_name(corruption: str) -> None:
    if not corruption or Path(corruption).name != corruption:
        raise ConfigError(f"not a corruption name: {corruption!r}")


def c_release_folder(name: DatasetName, root: Optional[PathLike]) -> Optional[Path]:
    """The released -C folder at ``root`` (``<root>/CIFAR-10-C``, or ``root`` itself), if it holds ``labels.npy``
    and at least one corruption file; ``root`` may also be an .npz file beside that folder."""
    _check_name(name)
    for folder in _c_candidates(_resolve_root(root), name):
        if (folder / "labels.npy").is_file() and any(
                f.suffix == ".npy" and f.name != "labels.npy" and f.is_file() for f in folder.iterdir()):
            return folder
    return None


def corrupted_file(name: DatasetName, root: Optional[PathLike], corruption: str) -> Optional[Path]:
    """The released file ``<corruption>.npy`` under ``root`` (see :func:`load_corrupted`), or None if absent."""
    _check_name(name)
    _check_corruption_name(corruption)
    root = _resolve_root(root)
    folder = _c_folder(root, name, corruption)
    return None if folder is None else folder / f"{corruption}.npy"


def _open_npy(path: Path) -> np.ndarray:
    """``path`` memory-mapped; a truncated or malformed file is a one-line ConfigError naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except _READ_ERRORS as e:
        raise ConfigError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); is it truncated? "
                          f"download or copy it again") from None


def _c_arrays(name: str, root: Path, corruption: str) -> Tuple[Path, np.ndarray, np.ndarray, int]:
    """The -C file of ``corruption``, its memory-mapped stack and labels, and N (images per severity)."""
    folder = _c_folder(root, name, corruption)
    if folder is None:
        raise DataNotFoundError(f"no {_C_FOLDER[name]}/{corruption}.npy under {root}")
    path, labels_path = folder / f"{corruption}.npy", folder / "labels.npy"
    if not labels_path.is_file():
        raise DataNotFoundError(f"{folder} holds {path.name} but no labels.npy; copy the whole "
                                f"{_C_FOLDER[name]} folder")
    stack = _open_npy(path)
    labels = _open_npy(labels_path).reshape(-1)
    total = stack.shape[0]
    if stack.ndim != 4 or stack.shape[-1] != 3 or total % SEVERITIES:
        raise ConfigError(f"{path}: expected {SEVERITIES} severities x N images (N x H x W x 3) stacked, got "
                          f"shape {stack.shape}")
    n = total // SEVERITIES
    if labels.shape[0] not in (n, total):
        raise ConfigError(f"{labels_path}: {labels.shape[0]} labels for {total} images in {path.name}")
    return path, stack, labels, n


def load_c_labels(name: DatasetName, root: Optional[PathLike], corruption: str) -> ImageSet:
    """The N test labels of a released -C folder (``labels.npy``; severity 1's when stacked), without pixels.

    For a stream run from the -C files alone: ``images`` is N x 3 x 0 x 0 (there are no clean images), ``labels``
    are those of severity 1 of ``<corruption>.npy``, ``source`` is the labels file.
    """
    _check_name(name)
    _check_corruption_name(corruption)
    path, _, labels, n = _c_arrays(name, _resolve_root(root), corruption)
    labels_path = path.parent / "labels.npy"
    s = _to_imageset(np.zeros((n, 0, 0, 3), np.uint8), np.array(labels[:n]), None, name, labels_path)
    s.source = str(labels_path)
    return s


def load_corrupted(name: DatasetName, root: Optional[PathLike], corruption: str,
                   severity: int) -> Optional[ImageSet]:
    """One severity of a released -C file (``CIFAR-10-C/<corruption>.npy``: 5 severities stacked), or None if absent.

    ``root`` may be the data folder, an .npz file inside it, or the -C folder itself; None tells the caller to
    generate the corruption instead. ``source`` of the result is the file read.
    """
    _check_name(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ConfigError(f"severity must be an integer from 1 to {SEVERITIES}, got {severity!r}")
    _check_corruption_name(corruption)
    root = _resolve_root(root)
    if _c_folder(root, name, corruption) is None:
        log.debug("no %s/%s.npy under %s", _C_FOLDER[name], corruption, root)
        return None
    path, stack, labels, n = _c_arrays(name, root, corruption)
    sl = slice((severity - 1) * n, severity * n)
    if labels.shape[0] != n:
        labels = labels[sl]
    try:
        images = np.array(stack[sl])
    except _READ_ERRORS as e:
        raise ConfigError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    log.info("using %s severity %d from %s", corruption, severity, path)
    s = _to_imageset(images, np.array(labels), None, name, path)
    s.source = str(path)
    return s


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


def _read_image(path: Path, size: Optional[int]) -> np.ndarray:
    """One image as uint8 H x W x 3; with ``size``: shorter side resized to ``size``, then centre-cropped square."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                if (nw, nh) != (w, h):
                    im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im)
    except OSError as e:
        raise ConfigError(f"{path}: not a readable image ({e})") from None


def list_class_folders(root: PathLike, classes: Optional[Sequence[str]] = None, max_per_class: Optional[int] = None,
                       seed: int = 0, what: str = "image folder", kind: str = "given classes"
                       ) -> Tuple[List[Path], List[int], List[str]]:
    """The images of a ``<root>/<class>/<image>`` tree, sorted by (folder, path), their labels and the class names.

    Labels index ``classes`` when given (a folder not among them is a one-line error naming ``kind``), else the
    sorted folder names (torchvision's ImageFolder order). ``max_per_class`` keeps a seeded subset per class.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"{what} {root} does not exist")
    if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class < 1):
        raise ConfigError(f"max_per_class must be a positive integer or omitted, got {max_per_class!r}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = [str(c) for c in classes] if classes is not None else folders
    index = {c: i for i, c in enumerate(names)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ConfigError(f"{what} {root} has class folders not among the {len(names)} {kind}: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    files: List[Path] = []
    labels: List[int] = []
    rng = np.random.default_rng(seed)
    for f in folders:
        members = sorted(p for p in (root / f).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if max_per_class is not None and len(members) > max_per_class:
            members = [members[i] for i in sorted(rng.permutation(len(members))[:max_per_class].tolist())]
        files += members
        labels += [index[f]] * len(members)
    if not files:
        raise DataNotFoundError(f"{what} {root} holds no images (expected <class>/<image> with one of "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, names


def load_image_folder(root: PathLike, classes: Optional[Sequence[str]] = None, size: Optional[int] = None,
                      max_per_class: Optional[int] = None, seed: int = 0) -> ImageSet:
    """An ImageFolder tree (``<root>/<class>/<image>``) as an :class:`ImageSet`.

    Labels follow ``classes`` when given (so several domains share one label space; a folder not in it is an
    error), else the sorted folder names (torchvision's ImageFolder order, which is ImageNet's class index for
    wnid folders). ``size`` resizes (shorter side) and centre-crops; without it all images must share one shape.
    ``max_per_class`` keeps a seeded random subset of each class (sorted file order otherwise).
    """
    root = Path(root).expanduser()
    files, labels, names = list_class_folders(root, classes, max_per_class, seed)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(lambda p: _read_image(p, size), files))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"image folder {root} holds images of {len(shapes)} sizes (e.g. "
                          f"{', '.join(str(s[:2]) for s in list(shapes)[:3])}); pass size=N to resize and crop")
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
    log.info("loaded %d images of %d classes from %s", len(files), len(names), root)
    return ImageSet(images=x, labels=torch.tensor(labels, dtype=torch.long), classes=names)


def load_imagenet_c(root: PathLike, corruption: str, severity: int, size: Optional[int] = None,
                    max_per_class: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                    seed: int = 0) -> ImageSet:
    """One corruption and severity of ImageNet-C in its released layout ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``."""
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ConfigError(f"severity must be an integer from 1 to {SEVERITIES}, got {severity!r}")
    if not corruption or Path(corruption).name != corruption:
        raise ConfigError(f"not a corruption name: {corruption!r}")
    folder = Path(root).expanduser() / corruption / str(severity)
    if not folder.is_dir():
        raise DataNotFoundError(f"no ImageNet-C folder {folder}; expected <root>/<corruption>/<severity>/<wnid>/")
    return load_image_folder(folder, classes=classes, size=size, max_per_class=max_per_class, seed=seed)


__all__ = ["CIFAR10_CLASSES", "ImageSet", "c_release_folder", "cache_dir", "corrupted_file", "default_data_root",
           "list_class_folders", "load_c_labels", "load_cifar", "load_corrupted", "load_image_folder",
           "load_imagenet_c"]
