"""End-to-end fidelity of the corruption engine: a source model's error on engine-generated vs. oracle-generated data.

    python benchmarks/corruption_fidelity.py --images 1000 --severity 5 --device cpu

The same ``--images`` shared CIFAR-10 test images are corrupted (CIFAR-10-C constants) twice: by the engine
(:func:`ctta.streams.corruptions.corrupt`) and by the NumPy/SciPy/OpenCV oracles the tests use (written from the
published generation script, ``tests/test_corruptions*.py``), stored as uint8 as the released files. The shared
ResNet-20 classifies both; the issue's bar is an error difference within 1.5 points per corruption.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from ctta import backbones
from ctta.engine import resolve_device
from ctta.streams.corruptions import CORRUPTIONS, corrupt, generated_corruptions

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
Oracle = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]  # uint8 HWC image -> float HWC in [0, 1]


def _oracles() -> Dict[str, Oracle]:
    """Per-image oracles from the test modules (uint8 HWC in, stored-as-uint8 float HWC out)."""
    sys.path.insert(0, str(ROOT / "tests"))
    t = importlib.import_module("test_corruptions")
    out: Dict[str, Oracle] = {}
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness"):
        out[name] = lambda img, c, rng, n=name: t._save(t._oracle(n, img[None] / 255.0, c, rng)[0])
    for name in ("defocus_blur", "gaussian_blur", "saturate", "pixelate", "jpeg_compression"):
        out[name] = lambda img, c, rng, n=name: t._added_oracle(n, img, c)
    out["zoom_blur"] = lambda img, c, rng: t._save(t._zoom_oracle(img, np.arange(*c)))
    out["fog"] = lambda img, c, rng: t._fog_oracle(rng, img, c)
    out["elastic_transform"] = lambda img, c, rng: t._elastic_oracle(rng, img, c)
    out["glass_blur"] = lambda img, c, rng: t._glass_oracle(rng, img, c)
    ms = importlib.import_module("test_corruptions_motion_snow")
    fs = importlib.import_module("test_corruptions_frost_spatter")
    out["motion_blur"] = lambda img, c, rng: t._save(ms._wand_motion(img / 255.0, c[0], c[1], rng.uniform(-45, 45)))
    out["snow"] = lambda img, c, rng: ms._snow_oracle(img, c, rng.standard_normal(img.shape[:2]),
                                                      rng.uniform(-135, -45))
    out["frost"] = lambda img, c, rng: fs._cifar_frost_oracle(rng, img, c, int(rng.integers(5)))
    out["spatter"] = lambda img, c, rng: fs._spatter_oracle(rng, img, c)
    out["speckle_noise"] = lambda img, c, rng: t._save(
        np.clip(img / 255.0 + img / 255.0 * rng.normal(size=img.shape, scale=c), 0, 1))
    return out


@torch.no_grad()
def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device, bs: int = 500) -> float:
    wrong = 0
    for i in range(0, x.shape[0], bs):
        wrong += int((model(x[i:i + bs].to(dev)).argmax(1).cpu() != y[i:i + bs]).sum())
    return 100.0 * wrong / x.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--corruptions", default=None, help="comma-separated (default: every generated one)")
    p.add_argument("--seed", type=int, default=1, help="engine seed; the oracle's NumPy generator gets the same")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args()
    dev = resolve_device(a.device)
    data = np.load(SHARED / "data" / "cifar10" / "test.npz")
    pick = np.random.default_rng(0).permutation(len(data["labels"]))[:a.images]
    x8, y = data["images"][pick], torch.from_numpy(data["labels"][pick].astype(np.int64))
    model = backbones.create("resnet20_cifar", num_classes=10,
                             weights=str(SHARED / "models" / "resnet20-12fca82f.th")).to(dev).eval()
    x = torch.from_numpy(x8).permute(0, 3, 1, 2).float().div_(255.0)
    oracles = _oracles()
    names = a.corruptions.split(",") if a.corruptions else list(generated_corruptions())
    rows = [{"corruption": "clean", "engine": _error(model, x, y, dev), "oracle": None}]
    print(f"clean error {rows[0]['engine']:.1f}%", flush=True)
    for name in names:
        c = CORRUPTIONS.get(name).levels["cifar10"][a.severity - 1]
        eng = corrupt(x.to(dev), name, a.severity, seed=a.seed).cpu()
        row = {"corruption": name, "engine": _error(model, eng, y, dev), "oracle": None, "difference": None}
        if name in oracles:
            rng = np.random.default_rng(a.seed)
            ref = np.stack([oracles[name](img, c, rng) for img in x8])
            ref_t = torch.from_numpy(np.ascontiguousarray(ref)).permute(0, 3, 1, 2).float()
            row["oracle"] = _error(model, ref_t, y, dev)
            row["difference"] = row["engine"] - row["oracle"]
            row["mean_abs_pixel_diff_255"] = float((eng - ref_t).abs().mean() * 255)
        rows.append(row)
        print(f"{name:18s} engine {row['engine']:5.1f}%  oracle "
              f"{row['oracle'] if row['oracle'] is None else format(row['oracle'], '5.1f')}%  "
              f"diff {row['difference'] if row['difference'] is None else format(row['difference'], '+.1f')}",
              flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
