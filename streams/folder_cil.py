"""Folder-based class-incremental benchmarks of the pretrained-model and few-shot CIL literature.

* ``imagenet_r_ci``: ImageNet-R, 200 classes in 10 sessions of 20 (B0 Inc20, the L2P / CODA-Prompt / LAMDA-PILOT
  table). Reads PILOT's released split (``<root>/imagenet-r/train/<wnid>/`` and ``.../test/<wnid>/``, 80:20) when
  present, else the plain release (``<root>/imagenet-r/<wnid>/``) split 80:20 per class by the seed.
* ``cub200_ci``: CUB-200-2011, 200 classes in 10 sessions of 20. Reads the official release
  (``CUB_200_2011/{images.txt, train_test_split.txt, image_class_labels.txt, classes.txt, images/}``, its
  train/test split) or PILOT's ``cub/train``, ``cub/test`` folders.
* ``cub200_fscil``: CUB-200 few-shot CIL (TOPIC, Tao et al. CVPR 2020; CEC's loader): 100 base classes, then 10
  sessions of 10-way 5-shot, classes in the release's order.
* ``miniimagenet_fscil``: miniImageNet few-shot CIL (TOPIC / CEC): ``miniimagenet/images/`` with
  ``miniimagenet/split/{train,test}.csv`` (``filename,wnid``; labels in order of first appearance, as CEC), 60 base
  classes, then 8 sessions of 5-way 5-shot; 84 x 84 images (test transform ``Resize(92)``, ``CenterCrop(84)``).

Few-shot samples: from the released index lists when ``index_list`` names their folder (TOPIC / CEC
``data/index_list/<dataset>/session_<k>.txt``: session 1 is the base data, session k > 1 the few-shot images, matched
by path), else drawn by the seed. ``class_order: pilot`` is LAMDA-PILOT's order (``np.random.seed(1993)``,
``np.random.permutation``), so a run lines up with PILOT's tables. Images are decoded lazily
(:class:`~.files.FileImages`: resize the shorter side, centre crop); tests build tiny trees in tmp.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ctta.errors import ConfigError, DataNotFoundError

from .base import STREAMS, Stream
from .datasets import ImageSet, default_data_root, list_class_folders
from .files import FileImages
from .incremental import check_int, class_incremental_stream, few_shot_stream, resolve_class_order, split_sessions

PILOT_SEED = 1993  # LAMDA-PILOT's exps/*.json "seed": [1993], used to permute the class order

ClassOrder = Union[None, str, Sequence[int]]


def _root(data_root: Optional[str]) -> Path:
    return Path(data_root).expanduser() if data_root else default_data_root()


def _find(root: Path, names: Sequence[str], check) -> Optional[Path]:
    """The first of ``root/<name>`` (then ``root`` itself) that passes ``check``."""
    for p in [root / n for n in names] + [root]:
        if p.is_dir() and check(p):
            return p
    return None


def _images(files: Sequence[Path], labels: Sequence[int], classes: List[str], crop: int, resize: int,
            workers: Optional[int]) -> ImageSet:
    return ImageSet(FileImages(files, crop=crop, resize=resize, workers=workers),
                    torch.tensor(list(labels), dtype=torch.long), classes)


def _has_class_folders(p: Path) -> bool:
    return any(d.is_dir() for d in p.iterdir())


def train_test_folders(folder: Path, what: str, seed: int, test_fraction: float = 0.2
                       ) -> Tuple[List[Path], List[int], List[Path], List[int], List[str], str]:
    """(train files, labels, test files, labels, class names, split) of ``folder``: its ``train/`` and ``test/`` class
    trees when present (split ``released``), else its class tree split per class by the seed (``seeded``)."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        tr, ytr, names = list_class_folders(folder / "train", what=f"{what} train")
        te, yte, _ = list_class_folders(folder / "test", names, what=f"{what} test", kind="train classes")
        return tr, ytr, te, yte, names, "released"
    files, labels, names = list_class_folders(folder, what=what)
    rng = np.random.default_rng([int(seed), 80])
    tr, ytr, te, yte = [], [], [], []
    for c in range(len(names)):
        members = [f for f, y in zip(files, labels) if y == c]
        n_test = int(round(test_fraction * len(members)))
        test_rows = set(rng.permutation(len(members))[:n_test].tolist())
        for i, f in enumerate(members):
            (te if i in test_rows else tr).append(f)
            (yte if i in test_rows else ytr).append(c)
    return tr, ytr, te, yte, names, "seeded"


def _cub_release(root: Path) -> Optional[Path]:
    return _find(root, ("CUB_200_2011", "cub200/CUB_200_2011", "CUB-200-2011"),
                 lambda p: (p / "train_test_split.txt").is_file() and (p / "images").is_dir())


def load_cub(root: Path, workers: Optional[int] = None, crop: int = 224, resize: int = 256
             ) -> Tuple[ImageSet, ImageSet, str, Path]:
    """CUB-200-2011 (train, test, split, folder): the official release's split, else PILOT's train/test folders."""
    rel = _cub_release(root)
    if rel is not None:
        def table(name: str) -> Dict[int, str]:
            path = rel / name
            if not path.is_file():
                raise DataNotFoundError(f"cub200: {path} is missing from the CUB_200_2011 release")
            rows = [line.split(" ", 1) for line in path.read_text().splitlines() if line.strip()]
            return {int(k): v.strip() for k, v in rows}

        images, split, label = table("images.txt"), table("train_test_split.txt"), table("image_class_labels.txt")
        names = [v for _, v in sorted(table("classes.txt").items())]
        parts: Dict[str, Tuple[List[Path], List[int]]] = {"1": ([], []), "0": ([], [])}
        for k in sorted(images):
            files, labels = parts[split[k]]
            files.append(rel / "images" / images[k])
            labels.append(int(label[k]) - 1)
        (tr, ytr), (te, yte) = parts["1"], parts["0"]
        return (_images(tr, ytr, names, crop, resize, workers), _images(te, yte, names, crop, resize, workers),
                "released", rel)
    folder = _find(root, ("cub", "CUB200", "cub200"), lambda p: (p / "train").is_dir() and (p / "test").is_dir())
    if folder is None:
        raise DataNotFoundError(f"cub200: neither {root}/CUB_200_2011/ (the official release: images/, images.txt, "
                                f"train_test_split.txt, image_class_labels.txt, classes.txt) nor {root}/cub/train and "
                                f"cub/test (LAMDA-PILOT's split); download CUB-200-2011 from Caltech's page")
    tr, ytr, te, yte, names, split_kind = train_test_folders(folder, "cub200", 0)
    return (_images(tr, ytr, names, crop, resize, workers), _images(te, yte, names, crop, resize, workers),
            split_kind, folder)


def load_imagenet_r_split(root: Path, seed: int, workers: Optional[int] = None, crop: int = 224, resize: int = 256
                          ) -> Tuple[ImageSet, ImageSet, str, Path]:
    """ImageNet-R (train, test, split, folder): PILOT's train/test folders, else the release split 80:20 by seed."""
    folder = _find(root, ("imagenet-r", "imagenet_r", "ImageNet-R"), _has_class_folders)
    if folder is None:
        raise DataNotFoundError(f"imagenet_r_ci: no folder {root}/imagenet-r/ (the release's <wnid>/ folders, or "
                                f"LAMDA-PILOT's train/ and test/ split of it); download ImageNet-R and unpack it there")
    tr, ytr, te, yte, names, split_kind = train_test_folders(folder, "imagenet_r_ci", seed)
    return (_images(tr, ytr, names, crop, resize, workers), _images(te, yte, names, crop, resize, workers),
            split_kind, folder)


def load_miniimagenet(root: Path, workers: Optional[int] = None, crop: int = 84, resize: int = 92
                      ) -> Tuple[ImageSet, ImageSet, Path]:
    """miniImageNet (train, test, folder) from ``images/`` + ``split/{train,test}.csv`` (CEC's layout and labels)."""
    folder = _find(root, ("miniimagenet", "mini_imagenet", "miniImageNet"),
                   lambda p: (p / "split" / "train.csv").is_file() and (p / "images").is_dir())
    if folder is None:
        raise DataNotFoundError(f"miniimagenet_fscil: no {root}/miniimagenet/ with images/ and split/train.csv, "
                                f"split/test.csv (the layout of the TOPIC / CEC release)")

    def read(name: str) -> List[Tuple[str, str]]:
        path = folder / "split" / name
        if not path.is_file():
            raise DataNotFoundError(f"miniimagenet_fscil: {path} is missing")
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        return [(r[0], r[1]) for r in rows[1:] if len(r) >= 2]

    train_rows, test_rows = read("train.csv"), read("test.csv")
    wnids: List[str] = []
    for _, w in train_rows:
        if w not in wnids:
            wnids.append(w)
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted({w for _, w in test_rows if w not in index})
    if unknown:
        raise ConfigError(f"miniimagenet_fscil: test.csv has classes not in train.csv: {', '.join(unknown[:5])}")

    def build(rows: List[Tuple[str, str]]) -> ImageSet:
        return _images([folder / "images" / n for n, _ in rows], [index[w] for _, w in rows], wnids, crop, resize,
                       workers)

    return build(train_rows), build(test_rows), folder


def read_index_list(folder: Union[str, Path], sessions: int, train: ImageSet, key) -> List[List[int]]:
    """Train rows of the few-shot sessions 2 .. ``sessions`` of a TOPIC / CEC index list (``session_<k>.txt``), each
    line matched to a train image by ``key(line)`` == ``key(path)``; a line with no match is a one-line error."""
    folder = Path(folder).expanduser()
    rows = {key(str(p)): i for i, p in enumerate(train.images.files)}
    out = []
    for k in range(2, sessions + 1):
        path = folder / f"session_{k}.txt"
        if not path.is_file():
            raise DataNotFoundError(f"index_list: {path} is missing (expected session_2.txt .. session_{sessions}.txt)")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [line for line in lines if key(line) not in rows]
        if missing:
            raise ConfigError(f"index_list {path}: {len(missing)} images not in the train data, e.g. {missing[0]}")
        out.append([rows[key(line)] for line in lines])
    return out


def _cub_key(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])  # <class folder>/<file>


def _mini_key(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]  # the file name (CEC: line.split('/')[3])


def pilot_order(num_classes: int) -> List[int]:
    """LAMDA-PILOT's class order: ``np.random.seed(1993); np.random.permutation(num_classes)``."""
    return np.random.RandomState(PILOT_SEED).permutation(num_classes).tolist()


def _order(class_order: ClassOrder, num_classes: int) -> Optional[List[int]]:
    if class_order == "pilot":
        return pilot_order(num_classes)
    if isinstance(class_order, str):
        raise ConfigError(f"class_order must be a list of class ids, 'pilot' or omitted, got {class_order!r}")
    return None if class_order is None else [int(c) for c in class_order]


def _ci_folder(name: str, num_classes: int):
    def build(data_root: Optional[str] = None, init_classes: int = 20, increment: int = 20, seed: int = 0,
              class_order: ClassOrder = None, num_sessions: Optional[int] = None, batch_size: int = 32,
              eval_batch_size: int = 256, epochs: int = 1, train_per_class: Optional[int] = None,
              test_per_class: Optional[int] = None, workers: Optional[int] = None) -> Stream:
        order = _order(class_order, num_classes)
        split_sessions(resolve_class_order(num_classes, seed, order), init_classes, increment, num_sessions)
        check_int("epochs", epochs)
        root = _root(data_root)
        if name == "cub200_ci":
            train, test, split_kind, folder = load_cub(root, workers)
        else:
            train, test, split_kind, folder = load_imagenet_r_split(root, seed, workers)
        if len(train.classes) != num_classes:
            raise ConfigError(f"{name}: {folder} holds {len(train.classes)} classes, expected {num_classes}")
        stream = class_incremental_stream(
            name, train, test, init_classes, increment, seed, order, num_sessions, batch_size, eval_batch_size,
            epochs, train_per_class, test_per_class,
            spec={"dataset": name.rsplit("_", 1)[0], "data_root": str(data_root) if data_root else None,
                  "split": split_kind, "class_order_kind": class_order if isinstance(class_order, str) else None})
        stream.provenance = {name: {"source": "files", "path": str(folder), "split": split_kind}}
        return stream

    build.__doc__ = (f"{name}: class-incremental from image folders ({num_classes} classes, sessions of classes, "
                     f"eval on all seen classes after each).")
    return build


def _fscil_folder(name: str):
    def build(data_root: Optional[str] = None, base_classes: int = 100 if name.startswith("cub") else 60,
              ways: int = 10 if name.startswith("cub") else 5, shots: int = 5, num_sessions: Optional[int] = None,
              seed: int = 1, index_list: Optional[str] = None, batch_size: int = 32, eval_batch_size: int = 256,
              epochs: int = 1, base_epochs: Optional[int] = None, train_per_class: Optional[int] = None,
              test_per_class: Optional[int] = None, workers: Optional[int] = None) -> Stream:
        check_int("shots", shots)
        n_classes = 200 if name.startswith("cub") else 100
        sessions = split_sessions(list(range(n_classes)), base_classes, ways, num_sessions)
        root = _root(data_root)
        if name.startswith("cub"):
            train, test, _, folder = load_cub(root, workers)
            key = _cub_key
        else:
            train, test, folder = load_miniimagenet(root, workers)
            key = _mini_key
        given = read_index_list(index_list, len(sessions), train, key) if index_list else None
        stream = few_shot_stream(name, train, test, base_classes, ways, shots, num_sessions, seed, None, given,
                                 batch_size, eval_batch_size, epochs, base_epochs, train_per_class, test_per_class,
                                 spec={"dataset": name.rsplit("_", 1)[0],
                                       "data_root": str(data_root) if data_root else None,
                                       "index_list": str(index_list) if index_list else None})
        stream.provenance = {name: {"source": "files", "path": str(folder),
                                    "few_shot": "index_list" if index_list else "seeded"}}
        return stream

    build.__doc__ = f"{name}: few-shot class-incremental (TOPIC / CEC protocol) from image files."
    return build


STREAMS.register("imagenet_r_ci", _ci_folder("imagenet_r_ci", 200))
STREAMS.register("cub200_ci", _ci_folder("cub200_ci", 200))
STREAMS.register("cub200_fscil", _fscil_folder("cub200_fscil"))
STREAMS.register("miniimagenet_fscil", _fscil_folder("miniimagenet_fscil"))

__all__ = ["load_cub", "load_imagenet_r_split", "load_miniimagenet", "pilot_order", "read_index_list",
           "train_test_folders"]
