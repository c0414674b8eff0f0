"""Corruption generation speed: the engine on a device vs. the ``imagecorruptions`` package on one CPU core.

    python benchmarks/corruption_speed.py --device cpu --images 200 --ref-images 20
    python benchmarks/corruption_speed.py --device cuda --images 10000 --ref-images 50 --all-severities

Two workloads, each corruption at severity 5 (``--all-severities``: 1..5):
* ``cifar``: the ``--images`` first shared CIFAR-10 test images (32x32, CIFAR-10-C constants) through
  :func:`ctta.streams.corruptions.corrupt` on ``--device`` (after a warm-up call), in chunks of ``--chunk``.
* ``imagenet``: 224x224 images (CIFAR upsampled) with the ImageNet-C constants, engine vs. ``imagecorruptions.corrupt``
  (the published NumPy/SciPy/OpenCV reference, one image at a time, one thread) on ``--ref-images`` images.
Prints a Markdown table and, with ``--out``, appends JSON lines.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ctta.engine import resolve_device
from ctta.streams.corruptions import CORRUPTION_ORDER, corrupt, generated_corruptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "test.npz"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _images(n: int) -> torch.Tensor:
    if DATA.is_file():
        arr = np.load(DATA)["images"][:n]
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g)


def _imagecorruptions():
    """The package's ``corrupt``; its import needs ``pkg_resources`` (gone from recent setuptools): stub it."""
    if importlib.util.find_spec("imagecorruptions") is None:
        return None
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            stub = types.ModuleType("pkg_resources")

            def resource_filename(package: str, rel: str) -> str:
                origin = importlib.util.find_spec(package.split(".")[0]).origin
                return os.path.join(os.path.dirname(origin), rel)

            stub.resource_filename = resource_filename
            sys.modules["pkg_resources"] = stub
    from imagecorruptions import corrupt as ic_corrupt

    return ic_corrupt


def _time_engine(x: torch.Tensor, name: str, severity: int, params: str, dev: torch.device, chunk: int) -> float:
    corrupt(x[:2].to(dev), name, severity, params=params)  # warm-up (kernels, caches, textures)
    _sync(dev)
    t = time.perf_counter()
    for i in range(0, x.shape[0], chunk):
        corrupt(x[i:i + chunk].to(dev, non_blocking=True), name, severity, params=params)
    _sync(dev)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=1000, help="CIFAR images per corruption and severity")
    p.add_argument("--ref-images", type=int, default=20, help="224x224 images for the engine-vs-reference ratio")
    p.add_argument("--chunk", type=int, default=2000, help="images per corrupt() call")
    p.add_argument("--corruptions", default=",".join(CORRUPTION_ORDER))
    p.add_argument("--all-severities", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = resolve_device(a.device)
    names = [c for c in a.corruptions.split(",") if c in generated_corruptions()]
    severities = range(1, 6) if a.all_severities else (5,)
    cifar = _images(a.images)
    big = torch.nn.functional.interpolate(_images(a.ref_images), size=(224, 224), mode="bilinear",
                                          align_corners=False).clamp_(0, 1)
    big = torch.round(big * 255) / 255
    ic = _imagecorruptions()
    rows = []
    total_engine = 0.0
    for name in names:
        t_cifar = sum(_time_engine(cifar, name, s, "cifar10", dev, a.chunk) for s in severities)
        total_engine += t_cifar
        t_big = _time_engine(big, name, 5, "imagenet", dev, a.chunk)
        t_ref = float("nan")
        if ic is not None:
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            u8 = (big * 255).round().byte().permute(0, 2, 3, 1).numpy()
            t = time.perf_counter()
            try:
                for img in u8:
                    ic(img, corruption_name=name, severity=5)
                t_ref = time.perf_counter() - t
            except Exception as err:  # e.g. glass_blur: imagecorruptions 1.1.2 passes multichannel= to skimage
                print(f"{name}: the reference failed ({type(err).__name__}: {err})", flush=True)
            torch.set_num_threads(torch_threads)
        row = {"corruption": name, "device": str(dev), "cifar_images": a.images * len(severities),
               "cifar_img_per_s": a.images * len(severities) / t_cifar,
               "imagenet_engine_img_per_s": big.shape[0] / t_big,
               "imagenet_reference_img_per_s": big.shape[0] / t_ref if t_ref == t_ref else None,
               "speedup_vs_reference": t_ref / t_big if t_ref == t_ref else None}
        rows.append(row)
        print(f"{name:18s} cifar {row['cifar_img_per_s']:9.0f} img/s | 224px engine {row['imagenet_engine_img_per_s']:8.1f}"
              f" img/s, reference {row['imagenet_reference_img_per_s'] or float('nan'):7.2f} img/s, "
              f"x{row['speedup_vs_reference'] or float('nan'):.1f}", flush=True)
    n_total = a.images * len(severities) * len(names)
    print(f"\nall: {n_total} CIFAR images in {total_engine:.1f} s ({n_total / total_engine:.0f} img/s) on {dev}; "
          f"projected for the 750k images of CIFAR-10-C: {750_000 / (n_total / total_engine):.0f} s")
    if a.out:
        meta = {"date": date.today().isoformat(), "host": platform.node(), "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
