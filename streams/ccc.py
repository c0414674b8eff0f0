"""CCC, Continuously Changing Corruptions (Press et al., NeurIPS 2023, "RDumb"; oripress/CCC@656dec3 ``generate.py``,
``make_imagenet_c.py``): an ImageNet stream of any length whose two-corruption mix drifts at a set speed while the
source model's accuracy stays near a difficulty baseline. Generated on the device from a clean image folder.

The generator, as released:

1. Severities live on a grid 0, 0.25, ..., 5; a fractional severity interpolates the ImageNet-C constants linearly
   from the identity level at 0 (``make_imagenet_c.py``'s ``interp1d`` tables, :data:`IDENTITY`).
2. For every ordered pair of corruptions (n1, n2) an accuracy matrix A[s1, s2] of the source model on images
   corrupted by n1 at s1 then n2 at s2 (CCC downloads the one it measured with a ResNet-50; here it is read from
   ``accuracy_matrix`` or calibrated with the run's model on ``calibration_images`` clean images, and cached).
3. The walk of a pair goes from (s1, 0) to (0, s2), each step lowering s1 or raising s2, chosen by CCC's
   ``find_path`` recursion so that its mean accuracy is closest to the baseline (:func:`find_walk`).
4. Pairs are drawn with Python's ``random`` seeded by ``seed`` exactly as ``GenerateDataset`` draws them (n2 of one
   walk is n1 of the next); each walk point holds ``speed`` images drawn without repeats from the folder, under
   ``RandomHorizontalFlip`` + ``RandomResizedCrop(224)``, n1 then n2 (8-bit after each), then JPEG quality 85.

``shards`` reads the released webdataset tars instead (``serial_00000.tar`` ..., one segment each) with the
standard library's ``tarfile`` (no webdataset dependency), for users who have them.

One walk (one pair) is one segment (its walk points are blocks, so batches run across points as in CCC); the
run keeps at most two chunks in memory whatever ``num_images`` is. Noise and crops are keyed per image, so a
given (folder, seed, baseline, speed, matrix) is one stream. Not reproduced: CCC's own random draws (its images
come from numpy/torch global generators, ours from per-image keys), so equal seeds give the same corruption
pairs and walks but other images and noise.
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError, DataNotFoundError
from ctta.seeding import stable_seed

from .base import STREAMS, Stream
from .corruptions.core import CORRUPTIONS, corruption_seed, quantize_8bit
from .corruptions.digital import jpeg_compression
from .corruptions.rng import ImageRng, content_keys
from .datasets import cache_dir, default_data_root
from .files import FileImages, TarImages, class_folder_files, index_shard
from .gather import Block, gathered_segment

log = logging.getLogger(__name__)

CCC_LENGTH = 7_500_000  # generate.py's cutoff
GRID = tuple(i / 4 for i in range(21))  # CCC's severity grid
#: generate.py's corruption lists per baseline accuracy (CCC-Easy >= 40, Medium >= 20, Hard below)
NOISES = {
    40: ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    20: ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "contrast", "elastic_transform", "pixelate"),
    0: ("gaussian_noise", "shot_noise", "impulse_noise", "contrast"),
}
_CCC_NAME = {"elastic_transform": "elastic", "jpeg_compression": "jpeg"}  # names in CCC's matrix keys
#: level 0 of make_imagenet_c.py's interpolation tables (shot noise interpolates 1 / c, from 0)
IDENTITY: Dict[str, Any] = {
    "gaussian_noise": 0.0, "shot_noise": None, "impulse_noise": 0.0, "defocus_blur": (0.0, 0.0),
    "glass_blur": (0.0, 0.0, 0.0), "motion_blur": (0.0, 0.0), "zoom_blur": (1.0, 1.0, 0.01),
    "snow": (0.1, 0.3, 3, 1.0, 10, 4, 1.0), "frost": (1.0, 0.0, None), "fog": (0.0, 2.0), "contrast": 1.0,
    "elastic_transform": (0.0, 999.0, 0.0), "pixelate": 1.0, "jpeg_compression": 85.0,
}
PRESETS = {"easy": 40, "medium": 20, "hard": 0}


def noises_for(baseline: float) -> Tuple[str, ...]:
    """The corruptions CCC mixes for a baseline accuracy (in %)."""
    return NOISES[40] if baseline >= 40 else NOISES[20] if baseline >= 20 else NOISES[0]


def _lerp(a: Any, b: Any, t: float) -> Any:
    if isinstance(a, tuple):
        return tuple(_lerp(u, v, t) for u, v in zip(a, b))
    if a is None or b is None:
        return b
    return a + (b - a) * t


def level_at(corruption: str, severity: float) -> Any:
    """The corruption's constants at a (fractional) severity in (0, 5], interpolated as CCC interpolates them."""
    levels = CORRUPTIONS.get(corruption).levels["imagenet"]
    if not 0 < severity <= 5:
        raise ConfigError(f"CCC severities lie in (0, 5], got {severity!r}")
    lo = int(math.floor(severity))
    t = severity - lo
    if corruption == "shot_noise":  # make_imagenet_c.py interpolates 1 / c from 0
        inv = [0.0] + [1.0 / c for c in levels]
        return 1.0 / (inv[lo] + (inv[min(lo + 1, 5)] - inv[lo]) * t)
    table = [IDENTITY[corruption]] + list(levels)
    if t == 0:
        return table[lo]
    return _lerp(table[lo], table[lo + 1], t)


def corrupt_at(x: Tensor, corruption: str, severity: float, seed: int) -> Tensor:
    """``corruption`` at a fractional ``severity`` on float NCHW images in [0, 1], 8-bit after (0: unchanged)."""
    if severity == 0:
        return x
    rng = ImageRng(corruption_seed(seed, corruption, int(round(severity * 4))), content_keys(x))
    return quantize_8bit(CORRUPTIONS.get(corruption).fn(x, level_at(corruption, severity), rng).clamp_(0.0, 1.0))


def ccc_transform(x: Tensor, n1: str, s1: float, n2: str, s2: float, seed: int) -> Tensor:
    """One CCC image: n1 at s1, then n2 at s2, then saved as JPEG quality 85 (CCC's tar files)."""
    return jpeg_compression(corrupt_at(corrupt_at(x, n1, s1, seed), n2, s2, seed), 85, None)


def find_walk(acc: np.ndarray, target: float) -> List[Tuple[int, int]]:
    """CCC's ``find_path``: the grid path from (i, 0) to (0, j), each step (i-1, j) or (i, j+1), whose mean
    accuracy is closest to ``target``, built greedily from the row i = 0 outwards; ties go to (i, j+1)."""
    n, m = acc.shape
    cost = np.full((n, m + 1), np.inf)
    length = np.ones((n, m + 1), dtype=np.int64)
    nxt: Dict[Tuple[int, int], Tuple[int, int]] = {}
    cost[0, :m] = acc[0]
    for j in range(m - 1, -1, -1):
        for i in range(1, n):
            a = abs((cost[i - 1, j] + acc[i, j]) / (length[i - 1, j] + 1) - target)
            b = abs((cost[i, j + 1] + acc[i, j]) / (length[i, j + 1] + 1) - target)
            step = (i - 1, j) if a < b else (i, j + 1)
            cost[i, j] = cost[step] + acc[i, j]
            length[i, j] = length[step] + 1
            nxt[(i, j)] = step
    best = min(range(1, n), key=lambda i: (abs(cost[i, 0] / length[i, 0] - target), i))
    path, at = [(best, 0)], (best, 0)
    while at[0] != 0:
        at = nxt[at]
        path.append(at)
    return path


def pair_sequence(noises: Sequence[str], seed: int):
    """The (n1, n2) pairs in CCC's order: ``random.seed(seed)``, n1 and n2 drawn distinct, then n1 := n2."""
    rnd = random.Random(seed)
    n1 = rnd.choice(noises)
    n2 = rnd.choice(noises)
    while n2 == n1:
        n2 = rnd.choice(noises)
    while True:
        yield n1, n2
        n1 = n2
        while n1 == n2:
            n2 = rnd.choice(noises)


def calibrate_pair(model: torch.nn.Module, images: Tensor, labels: Tensor, n1: str, n2: str, grid: Sequence[float],
                   seed: int, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Accuracy (%) of ``model`` on ``images`` (uint8, centre-cropped) under n1 at s1 then n2 at s2, for the grid."""
    out = np.zeros((len(grid), len(grid)))
    model.eval()
    with torch.no_grad():
        for a, s1 in enumerate(grid):
            for b, s2 in enumerate(grid):
                correct = 0
                for k in range(0, len(images), batch_size):
                    x = images[k:k + batch_size].to(device).float().div_(255.0)
                    x = ccc_transform(x, n1, s1, n2, s2, seed)
                    correct += int((model(x).argmax(1).cpu() == labels[k:k + batch_size]).sum())
                out[a, b] = 100.0 * correct / len(images)
    return out


def load_matrices(path: str) -> Dict[str, np.ndarray]:
    """Accuracy matrices keyed ``n1_<n1>_n2_<n2>`` (CCC's ``ccc_accuracy_matrix.pickle``, or a ``.pt`` of ours)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"accuracy_matrix {p} does not exist (CCC's ccc_accuracy_matrix.pickle, or omit it "
                                f"to calibrate with the run's model)")
    try:
        data = torch.load(p, weights_only=False) if p.suffix == ".pt" else pickle.loads(p.read_bytes())
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"accuracy_matrix {p} is not readable ({type(e).__name__}: {e})") from None
    return {str(k): np.asarray(v, dtype=np.float64) for k, v in dict(data).items()}


def _key(n1: str, n2: str) -> str:
    return f"n1_{_CCC_NAME.get(n1, n1)}_n2_{_CCC_NAME.get(n2, n2)}"


class Calibration:
    """The accuracy matrix of each pair: from a file, or measured with a model once and cached on disk."""

    def __init__(self, matrices: Optional[Dict[str, np.ndarray]], model: Optional[torch.nn.Module],
                 clean: Optional[Tuple[Tensor, Tensor]], grid: Sequence[float], seed: int, cache: Optional[Path],
                 device: torch.device) -> None:
        self.matrices, self.model, self.clean, self.grid = dict(matrices or {}), model, clean, tuple(grid)
        self.seed, self.cache, self.device = seed, cache, device
        if cache is not None and cache.is_file():
            self.matrices.update(torch.load(cache, weights_only=False))

    def __call__(self, n1: str, n2: str) -> np.ndarray:
        key = _key(n1, n2)
        if key not in self.matrices:
            if self.model is None or self.clean is None:
                raise ConfigError(f"the accuracy matrix has no entry {key!r}; give a complete accuracy_matrix or "
                                  f"let the run calibrate with its model")
            log.info("CCC: calibrating %s -> %s on %d images (%d x %d severities)", n1, n2, len(self.clean[0]),
                     len(self.grid), len(self.grid))
            self.matrices[key] = calibrate_pair(self.model, *self.clean, n1, n2, self.grid, self.seed, self.device)
            if self.cache is not None:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.matrices, self.cache)
        m = self.matrices[key]
        if m.shape != (len(self.grid), len(self.grid)):
            raise ConfigError(f"accuracy matrix {key!r} is {m.shape[0]} x {m.shape[1]}, the severity grid has "
                              f"{len(self.grid)} levels")
        return m


def _cache_file(model: torch.nn.Module, root: Path, grid: Sequence[float], n: int, seed: int) -> Path:
    h = hashlib.sha1()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes()[:4096])
    h.update(f"{root.resolve()}|{tuple(grid)}|{n}|{seed}".encode())
    return cache_dir() / "ccc" / f"calibration-{h.hexdigest()[:16]}.pt"


def _shard_index(tar: Path) -> Tuple[List[int], List[int], List[int]]:
    """:func:`~.files.index_shard`, cached on disk by the tar's path, size and modification time."""
    st = tar.stat()
    key = hashlib.sha1(f"{tar.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "ccc" / f"shard-{key}.npz"
    if cached.is_file():
        z = np.load(cached)
        return z["offsets"].tolist(), z["sizes"].tolist(), z["labels"].tolist()
    out = index_shard(tar)
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cached, offsets=np.asarray(out[0]), sizes=np.asarray(out[1]), labels=np.asarray(out[2]))
    return out


def released_shards(folder: str, num_images: int, batch_size: int, workers: Optional[int]) -> Stream:
    """CCC's released webdataset shards (``serial_00000.tar`` ...: ``<key>.input.jpg`` 224 x 224, ``<key>.output.cls``
    the ImageNet class index) read in order, one segment per shard, ``num_images`` in all; no webdataset needed."""
    root = Path(folder).expanduser()
    tars = sorted(root.glob("serial_*.tar")) or sorted(root.glob("*.tar"))
    if not tars:
        raise DataNotFoundError(f"shards: no serial_*.tar in {root} (a CCC dataset folder such as "
                                f"baseline_20_transition+speed_1000_seed_44/)")
    segments, total = [], 0
    for tar in tars:
        if total >= num_images:
            break
        offsets, sizes, labels = _shard_index(tar)
        take = min(len(offsets), num_images - total)
        block = Block(TarImages(tar, offsets, sizes, workers=workers), torch.arange(take),
                      torch.tensor(labels[:take], dtype=torch.long))
        segments.append(gathered_segment(tar.stem, "adapt", [block], batch_size, meta={"shard": str(tar)}))
        total += take
    spec = {"name": "ccc", "shards": str(folder), "num_images": num_images, "batch_size": batch_size}
    return Stream(name="ccc", segments=segments, num_classes=1000, setting="tta", spec=spec,
                  provenance={"ccc": {"source": "files", "path": str(root), "shards": len(segments)}})


def ccc(data_root: Optional[str] = None, baseline: Any = "medium", speed: int = 1000, seed: int = 44,
        num_images: int = CCC_LENGTH, batch_size: int = 64, accuracy_matrix: Optional[str] = None,
        calibration_images: int = 200, severity_step: float = 0.25, crop: str = "random",
        workers: Optional[int] = None, model: Optional[torch.nn.Module] = None, device: Any = "cpu",
        shards: Optional[str] = None) -> Stream:
    """CCC: continuously changing corruption pairs generated from a clean ImageNet folder (val/), any length, or
    read from its released webdataset shards (shards: the folder of serial_*.tar)."""
    from .imagenet import find_val, imagenet_classes

    for name, v in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if shards:
        return released_shards(shards, num_images, batch_size, workers)

    base = PRESETS.get(baseline, baseline) if isinstance(baseline, str) else baseline
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 <= base <= 100:
        raise ConfigError(f"baseline must be easy / medium / hard or an accuracy in % (0-100), got {baseline!r}")
    for name, v in (("speed", speed), ("calibration_images", calibration_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if crop not in ("random", "center"):
        raise ConfigError(f"crop must be random (CCC) or center, got {crop!r}")
    steps = 5 / severity_step if isinstance(severity_step, (int, float)) and severity_step > 0 else 0.5
    if abs(steps - round(steps)) > 1e-9:
        raise ConfigError(f"severity_step must divide 5 (CCC: 0.25), got {severity_step!r}")
    grid = tuple(k * severity_step for k in range(int(round(steps)) + 1))
    root = Path(data_root).expanduser() if data_root else default_data_root()
    val = find_val(root)
    if val is None:
        raise DataNotFoundError(f"CCC is generated from clean ImageNet images: no {root}/val/<wnid>/*.JPEG (or wnid "
                                f"folders in {root})")
    files, labels, _ = class_folder_files(val, imagenet_classes(), "CCC source images")
    labels_t = torch.tensor(labels, dtype=torch.long)
    n_files = len(files)
    matrices = load_matrices(accuracy_matrix) if accuracy_matrix else None
    clean = cache = None
    if matrices is None:
        if model is None:
            raise ConfigError("CCC needs the accuracy matrix of its source model: give accuracy_matrix (CCC's "
                              "ccc_accuracy_matrix.pickle) or run it through ctta-bench / run_experiment, which "
                              "calibrates with the run's backbone")
        pick = torch.randperm(n_files, generator=torch.Generator().manual_seed(stable_seed(seed, "ccc-cal")))
        pick = pick[:calibration_images]
        clean = (FileImages(files, crop=224, resize=256, workers=workers)[pick], labels_t[pick])
        cache = _cache_file(model, val, grid, calibration_images, seed)
    calib = Calibration(matrices, model, clean, grid, seed, cache, torch.device(device))
    source = FileImages(files, crop=224, resize=None if crop == "random" else 256, workers=workers,
                        random_crop_seed=stable_seed(seed, "ccc-crop") if crop == "random" else None)
    noises = noises_for(base)
    segments, total, point = [], 0, 0
    walks: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}  # a pair's walk, computed once (pairs recur)
    for walk_index, (n1, n2) in enumerate(pair_sequence(noises, seed)):
        if total >= num_images:
            break
        if (n1, n2) not in walks:
            walks[(n1, n2)] = find_walk(calib(n1, n2), base)
        blocks = []
        for i, j in walks[(n1, n2)]:
            if total >= num_images:
                break
            take = min(speed, num_images - total)
            gen = torch.Generator().manual_seed(stable_seed(seed, "ccc-point", point))
            idx = torch.cat([torch.randperm(n_files, generator=gen) for _ in range(-(-take // n_files))])[:take]
            rows = idx + point * n_files if crop == "random" else idx  # a new crop per walk point

            def transform(x: Tensor, a: float = grid[i], b: float = grid[j], u: str = n1, v: str = n2) -> Tensor:
                return ccc_transform(x, u, a, v, b, seed)

            blocks.append(Block(source, rows, labels_t[idx], transform=transform))
            total += take
            point += 1
        walk = [(grid[i], grid[j]) for i, j in walks[(n1, n2)][:len(blocks)]]
        segments.append(gathered_segment(f"{n1}>{n2}#{walk_index + 1}", "adapt", blocks, batch_size,
                                         meta={"n1": n1, "n2": n2, "walk": walk, "speed": speed}))
    spec = {"name": "ccc", "data_root": str(data_root) if data_root else None, "baseline": base, "speed": speed,
            "seed": seed, "num_images": num_images, "batch_size": batch_size, "severity_step": severity_step,
            "crop": crop, "accuracy_matrix": str(accuracy_matrix) if accuracy_matrix else None,
            "calibration_images": calibration_images if matrices is None else None}
    return Stream(name="ccc", segments=segments, num_classes=1000, setting="tta", spec=spec,
                  provenance={"ccc": {"source": "generated", "engine": "ctta.streams.ccc", "images": str(val),
                                      "calibration": str(accuracy_matrix or cache)}})


STREAMS.register("ccc", ccc)
