"""``ctta-bench corrupt``: write a dataset's corrupted copies in the original -C layout, for ctta-bench and other tools.

The layout is CIFAR-10-C's: ``<out>/<corruption>.npy`` holds severities 1..5 stacked (uint8, 5N x H x W x 3, severity
s at rows ``(s-1)N .. sN``) and ``labels.npy`` the labels repeated for the 5 severities. Files are written whole
(a temporary file renamed at the end), so an interrupted run leaves only finished corruptions, and a rerun skips
them. The images come from the same :func:`~ctta.streams.corruptions.corrupt` calls as a generated stream with the
same seed, so the files and a stream built without them agree image for image.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from ctta.errors import ConfigError
from ctta.streams.corruptions import CORRUPTION_ORDER, CORRUPTIONS, SEVERITIES, corrupt, generated_corruptions
from ctta.streams.datasets import ImageSet

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "digits")


def load_clean(dataset: str, data_root: Optional[Union[str, Path]] = None, train: bool = False,
               download: bool = False) -> ImageSet:
    """The clean split to corrupt: CIFAR-10/100 (from ``data_root``) or the offline digits set."""
    if dataset == "digits":
        from ctta.streams.digits import load_digits

        return load_digits(train=train)
    if dataset not in ("cifar10", "cifar100"):
        raise ConfigError(f"unknown dataset {dataset!r} for corrupt; choose one of {', '.join(DATASETS)}")
    from ctta.streams.datasets import load_cifar

    return load_cifar(dataset, data_root, train=train, download=download)


def _names(corruptions: Union[str, Sequence[str], None]) -> list:
    if corruptions in (None, "all"):
        return list(CORRUPTION_ORDER)
    if corruptions == "generated":
        return list(generated_corruptions())
    names = [c.strip() for c in corruptions.split(",")] if isinstance(corruptions, str) else list(corruptions)
    for c in names:
        CORRUPTIONS.get(c)  # unknown names fail with the valid list
    return names


def write_c_folder(clean: ImageSet, out: Union[str, Path], corruptions: Union[str, Sequence[str], None] = "all",
                   seed: int = 0, params: str = "cifar10", device: Union[str, torch.device] = "cpu",
                   batch_size: int = 1000, progress: bool = True, overwrite: bool = False) -> Dict[str, Path]:
    """Write ``<corruption>.npy`` (5 severities) and ``labels.npy`` for ``clean`` into ``out``; returns the files.

    Existing complete files are kept unless ``overwrite``; ``batch_size`` only sets memory use (results do not
    depend on it: each image's corruption is keyed by its content).
    """
    names = _names(corruptions)
    missing = [c for c in names if c not in generated_corruptions()]
    if missing:
        raise ConfigError(f"cannot generate {', '.join(missing)} yet; generated: {', '.join(generated_corruptions())}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(clean)
    dev = torch.device(device)
    h, w = clean.images.shape[-2:]
    files: Dict[str, Path] = {}
    labels = np.tile(clean.labels.numpy().astype(np.uint8 if int(clean.labels.max()) < 256 else np.int64),
                     SEVERITIES)
    files["labels"] = _save(out / "labels.npy", labels)
    bar = tqdm(total=len(names) * SEVERITIES * n, unit="img", disable=not progress, dynamic_ncols=True,
               desc="corrupt")
    for name in names:
        path = out / f"{name}.npy"
        if path.is_file() and not overwrite and _complete(path, (SEVERITIES * n, h, w, 3)):
            log.info("keeping %s (already complete)", path)
            bar.update(SEVERITIES * n)
            files[name] = path
            continue
        stack = np.empty((SEVERITIES * n, h, w, 3), dtype=np.uint8)
        for s in range(1, SEVERITIES + 1):
            for i in range(0, n, batch_size):
                x = clean.images[i:i + batch_size].to(dev).float().div_(255.0)
                y = corrupt(x, name, s, seed=seed, params=params)
                u8 = torch.round(y * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                stack[(s - 1) * n + i:(s - 1) * n + i + u8.shape[0]] = u8
                bar.update(u8.shape[0])
        files[name] = _save(path, stack)
        log.info("wrote %s", path)
    bar.close()
    meta = {"format": "CIFAR-10-C layout: <corruption>.npy = 5 severities x N images (uint8 NHWC), labels.npy",
            "num_images": n, "corruptions": names, "seed": seed, "params": params, "generator": "ctta-bench"}
    (out / "ctta_bench_corrupt.json").write_text(json.dumps(meta, indent=2))
    return files


def _complete(path: Path, shape: tuple) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.uint8


def _save(path: Path, array: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)
    return path


def corrupt_parser() -> "argparse.ArgumentParser":
    """Arguments of ``ctta-bench corrupt``."""
    import argparse

    p = argparse.ArgumentParser(prog="ctta-bench corrupt",
                                description="Write a dataset's corruptions (5 severities each) in the -C layout.")
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--out", required=True, help="output folder (<corruption>.npy, labels.npy)")
    p.add_argument("--data-root", help="folder or .npz of the clean dataset (CIFAR)")
    p.add_argument("--download", action="store_true", help="download the clean dataset if absent (online)")
    p.add_argument("--train", action="store_true", help="corrupt the train split instead of the test split")
    p.add_argument("--corruptions", default="all", help="comma-separated names, 'all' (15) or 'generated'")
    p.add_argument("--params", default=None, help="constants: cifar10 (32x32, default for CIFAR/digits) or imagenet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=1000, help="images per corrupt() call (memory only)")
    p.add_argument("--overwrite", action="store_true", help="regenerate files that already exist")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str]) -> int:
    """``ctta-bench corrupt ...``: parse, load the clean split, write the folder; errors are CttaErrors."""
    from ctta.engine import resolve_device

    args = corrupt_parser().parse_args(list(argv))
    clean = load_clean(args.dataset, args.data_root, train=args.train, download=args.download)
    files = write_c_folder(clean, args.out, args.corruptions, seed=args.seed, params=args.params or "cifar10",
                           device=resolve_device(args.device), batch_size=args.batch_size,
                           progress=not args.no_progress, overwrite=args.overwrite)
    log.info("%d files in %s", len(files), args.out)
    return 0
