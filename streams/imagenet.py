"""ImageNet-scale test-time streams: ImageNet-C (released folders or generated on the device) and its relatives.

Every stream reads image files lazily (:class:`~.files.FileImages`), so a 50 000-image domain costs a list of paths
until the engine fetches a chunk. Labels are indices into ImageNet's 1000 classes in the standard order (the wnid
list timm ships, ``timm.data.ImageNetInfo``), so a 1000-way pretrained model needs no mapping:

* ``imagenet_c``: the released layout ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (5000 images per domain by
  default, as RobustBench and the mariodoebler benchmark evaluate; ``num_samples`` up to 50 000), and every
  corruption without files generated on the device from the validation folder (``<root>/val/<wnid>/*.JPEG``) in
  ``make_imagenet_c.py``'s order: resize 256, centre crop 224, corrupt with the ImageNet-C constants, then JPEG
  quality 85 as the release was saved. All
  orders and label-shift options of the CIFAR-10-C stream apply (:func:`.corruption_stream.corruption_stream`).
* ``imagenet_r``, ``imagenet_a`` (200-class subsets: labels index the subset, and ``Stream.output_classes`` tells
  the run to keep only those outputs of the 1000-way model, as the mariodoebler benchmark masks them),
  ``imagenet_sketch`` and ``imagenet_v2`` (folders ``0`` .. ``999``), each one shuffled ``adapt`` domain
  (resize 256, centre crop 224).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ctta.errors import ConfigError, DataNotFoundError
from ctta.seeding import stable_seed

from .base import STREAMS, Stream
from .corruption_stream import _corruption_list, check_stream_options, corruption_stream
from .datasets import ImageSet, default_data_root
from .files import FileImages, class_folder_files
from .gather import Block, gathered_segment
from .probes import check_probes, probe_count

log = logging.getLogger(__name__)

IMAGENET_C_DEFAULT_SAMPLES = 5000
_C_NAMES = ("ImageNet-C", "imagenet-c", "imagenet_c")
_VAL_NAMES = ("val", "ILSVRC2012_img_val", "imagenet/val", "ImageNet/val")


def imagenet_classes() -> List[str]:
    """ImageNet-1k's 1000 wnids in the standard class order (timm's bundled list)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def subset_classes(name: str) -> List[str]:
    """The 200 wnids of ImageNet-R (``imagenet_r``) or ImageNet-A (``imagenet_a``), in ImageNet's order (the
    lists timm ships beside its ImageNet-1k synsets)."""
    from importlib import resources

    wnids = (resources.files("timm.data") / "_info" / f"{name}_synsets.txt").read_text().split()
    order = {w: i for i, w in enumerate(imagenet_classes())}
    return sorted(wnids, key=order.__getitem__)


def _holds_wnids(folder: Path) -> bool:
    return folder.is_dir() and any(d.is_dir() and d.name.startswith("n") and d.name[1:].isdigit()
                                   for d in folder.iterdir())


def find_val(root: Path) -> Optional[Path]:
    """The ImageNet validation folder in wnid layout under ``root`` (``val/``, ...), or ``root`` itself."""
    for sub in _VAL_NAMES:
        if _holds_wnids(root / sub):
            return root / sub
    return root if _holds_wnids(root) else None


def find_c_root(root: Path) -> Optional[Path]:
    """The folder holding ImageNet-C's ``<corruption>/<severity>/`` folders: ``root/ImageNet-C`` or ``root``."""
    from .corruptions import CORRUPTION_ORDER

    for folder in [root / n for n in _C_NAMES] + [root]:
        if folder.is_dir() and any((folder / c).is_dir() for c in CORRUPTION_ORDER):
            return folder
    return None


def _read_list(path: Union[str, Path]) -> List[str]:
    """Relative paths (``<wnid>/<file>``) of an image list, one per line (RobustBench's format: path [label])."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"image_list {p} does not exist")
    rels = [line.split()[0] for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not rels:
        raise ConfigError(f"image_list {p} names no images")
    return rels


def imagenet_c(data_root: Optional[str] = None, corruptions: Union[str, Sequence[str]] = "all", severity: int = 5,
               batch_size: int = 64, num_samples: Optional[int] = IMAGENET_C_DEFAULT_SAMPLES, order: str = "continual",
               seed: int = 1, clean_eval: bool = False, rounds: Optional[int] = None, interleave_clean: bool = False,
               clean_ratio: float = 0.0, label_shift: Any = None, generate_missing: bool = True,
               image_list: Optional[str] = None, workers: Optional[int] = None,
               jpeg_quality: Optional[int] = 85, probes: Optional[str] = None, probe_samples: int = 192) -> Stream:
    """ImageNet-C: released folders where present, else generated on the device from val/ (resize 256, crop 224,
    corrupt, then JPEG at jpeg_quality: 85 as the release was saved; null: not compressed)."""
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int)
                                     or not 1 <= jpeg_quality <= 100):
        raise ConfigError(f"jpeg_quality must be an integer from 1 to 100 or null, got {jpeg_quality!r}")
    opts = check_stream_options(severity, batch_size, num_samples, order, rounds, interleave_clean, clean_ratio,
                                label_shift)
    check_probes(probes, probe_samples, clean_eval, order, opts.rounds)
    names = _corruption_list(corruptions)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    classes = imagenet_classes()
    val, c_root = find_val(root), find_c_root(root)
    wanted = _read_list(image_list) if image_list else None
    if val is None and c_root is None:
        raise DataNotFoundError(
            f"no ImageNet data under {root}: expected the validation images as {root}/val/<wnid>/*.JPEG (to "
            f"generate ImageNet-C) and/or the released {root}/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG; "
            f"ImageNet is not downloadable automatically (https://image-net.org, ImageNet-C: "
            f"https://zenodo.org/record/2235448)")
    clean_missing = None
    if val is not None:
        files, labels, _ = class_folder_files(val, classes, "ImageNet validation")
        rel = [f"{f.parent.name}/{f.name}" for f in files]
        images = FileImages(files, crop=224, resize=256, workers=workers)
    else:
        first = next((c_root / c / str(severity) for c in names if (c_root / c / str(severity)).is_dir()), None)
        if first is None:
            raise DataNotFoundError(f"none of {', '.join(names)} (severity {severity}) is in {c_root}, and there is "
                                    f"no validation folder ({root}/val/<wnid>/) to generate them from")
        files, labels, _ = class_folder_files(first, classes, "ImageNet-C")
        rel = [f"{f.parent.name}/{f.name}" for f in files]
        images = FileImages(files, crop=224, workers=workers)
        clean_missing = (f"only ImageNet-C folders were found in {c_root}, no validation images; put them in "
                         f"{root}/val/<wnid>/*.JPEG")
    if wanted is not None:
        pos = {r: i for i, r in enumerate(rel)}
        missing = [r for r in wanted if r not in pos]
        if missing:
            raise DataNotFoundError(f"image_list names {len(missing)} image(s) not in the data, e.g. {missing[0]}")
        keep = [pos[r] for r in wanted]
        images, labels, rel = images.subset(keep), [labels[i] for i in keep], wanted
    clean = ImageSet(images, torch.tensor(labels, dtype=torch.long), classes, source=str(val or c_root))

    def released(c: str, s: int) -> Optional[ImageSet]:
        folder = c_root / c / str(s) if c_root is not None else None
        if folder is None or not folder.is_dir():
            return None
        paths = [folder / r for r in rel]
        absent = sum(not p.is_file() for p in paths[:: max(1, len(paths) // 200)])  # a sample, not 50k stats
        if absent:
            raise DataNotFoundError(f"{folder} lacks images the stream uses (e.g. {rel[0]}); use the complete "
                                    f"ImageNet-C release or an image_list of the images it holds")
        return ImageSet(FileImages(paths, crop=224, workers=workers), clean.labels.clone(), classes,
                        source=str(folder))

    spec = {"dataset": "imagenet", "data_root": str(data_root) if data_root else None,
            "generate_missing": generate_missing, "image_list": str(image_list) if image_list else None}
    return corruption_stream("imagenet_c", clean, names, severity, batch_size, num_samples, order, seed, clean_eval,
                             params="imagenet", files=released, spec=spec, rounds=rounds,
                             interleave_clean=interleave_clean, clean_ratio=clean_ratio, label_shift=label_shift,
                             generate_missing=generate_missing, clean_missing=clean_missing,
                             jpeg_quality=jpeg_quality, probes=probes, probe_samples=probe_samples)


def _variant(name: str, folder_names: Tuple[str, ...], subset: bool, digit_folders: bool = False):
    def build(data_root: Optional[str] = None, batch_size: int = 64, num_samples: Optional[int] = None,
              seed: int = 1, workers: Optional[int] = None, probes: str = "none", probe_samples: int = 192) -> Stream:
        check_stream_options(5, batch_size, num_samples, "continual")
        check_probes(probes, probe_samples, allowed=("none", "seen", "all"), what=f"{name} (one domain, no clean set)")
        root = Path(data_root).expanduser() if data_root else default_data_root()
        folder = next((root / n for n in folder_names if (root / n).is_dir()), None)
        if folder is None and root.is_dir() and any(d.is_dir() for d in root.iterdir()):
            folder = root  # --data-root points at the dataset's own folder
        if folder is None:
            raise DataNotFoundError(f"{name}: no folder {root}/{folder_names[0]}/ (the released layout, class "
                                    f"folders of images); download it from the dataset's page and unpack it there")
        full = imagenet_classes()
        if digit_folders:  # ImageNetV2: folders 0 .. 999 are the class indices
            classes = [str(i) for i in range(1000)]
            files, labels, _ = class_folder_files(folder, classes, name)
        else:
            classes = subset_classes(name) if subset else full
            files, labels, _ = class_folder_files(folder, classes, name)
        n = len(files)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, name)))
        held = None
        if probes != "none":  # held-out images of the domain, predicted after it (and before, with all)
            per = probe_count(probe_samples, batch_size)
            if per >= n:
                raise ConfigError(f"{name}: probe_samples {probe_samples} leaves none of its {n} images")
            held, perm = perm[:per], perm[per:]
        take = min(num_samples or len(perm), len(perm))
        order = perm[:take]
        images = FileImages(files, crop=224, resize=256, workers=workers)
        y = torch.tensor(labels, dtype=torch.long)
        segments = [gathered_segment(name, "adapt", [Block(images, order, y[order])], batch_size,
                                     meta={"dataset": name})]
        if held is not None:
            def probe(after: str):
                return gathered_segment(f"probes@{after or 'start'}", "eval", [Block(images, held, y[held])],
                                        batch_size, groups=[name], role="probe",
                                        meta={"after": after, "probes": probes} if after else {"probes": probes})
            segments = ([probe("")] if probes == "all" else []) + segments + [probe(name)]
        spec = {"name": name, "data_root": str(data_root) if data_root else None, "batch_size": batch_size,
                "num_samples": take, "seed": seed}
        if held is not None:
            spec.update(probes=probes, probe_samples=int(len(held)))
        stream = Stream(name=name, segments=segments, num_classes=len(classes) if subset else 1000, setting="tta",
                        spec=spec, provenance={name: {"source": "files", "path": str(folder)}})
        if subset:
            stream.output_classes = [full.index(w) for w in classes]
        return stream

    build.__doc__ = (f"{name}: one shuffled adapt domain from its released folder"
                     + (" (200 classes; the model's outputs are masked to them)" if subset else "") + ".")
    return build


STREAMS.register("imagenet_c", imagenet_c)
STREAMS.register("imagenet_r", _variant("imagenet_r", ("imagenet-r", "imagenet_r", "ImageNet-R"), subset=True))
STREAMS.register("imagenet_a", _variant("imagenet_a", ("imagenet-a", "imagenet_a", "ImageNet-A"), subset=True))
STREAMS.register("imagenet_sketch", _variant("imagenet_sketch", ("sketch", "imagenet-sketch", "ImageNet-Sketch"),
                                             subset=False))
STREAMS.register("imagenet_v2", _variant("imagenet_v2", ("imagenetv2-matched-frequency-format-val", "imagenet_v2",
                                                         "ImageNetV2"), subset=False, digit_folders=True))
