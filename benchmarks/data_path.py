"""The bounded data path, measured: peak memory against stream length, and the data path's throughput against the model's.

Writes a synthetic ImageNet-layout validation folder (``--images`` JPEGs of 300 x 260 under 10 wnids) to a temp
folder, then, each in a fresh subprocess so that peak RSS is its own:

* memory: ``imagenet_c`` generated on the device (gaussian_noise-5 from val/, resize 256 / crop 224) of 1x, 4x and
  16x ``--base`` images per domain, run through the ``source`` strategy on a tiny CNN, with automatic chunks, with
  ``--chunk`` images per chunk, and whole-segment (the old path: chunk = the domain). Peak host RSS
  (``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
* throughput, in one process: the data path alone (fetch + decode + corrupt, chunks iterated without a model), the
  model alone (``--model``, default timm resnet50 with random weights, on one resident batch) and both together.

    python benchmarks/data_path.py --device cpu --base 256 --chunk 128 --model resnet50
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_tree(root: Path, n: int) -> None:
    from PIL import Image

    from ctta.streams.imagenet import imagenet_classes

    wnids = imagenet_classes()[:10]
    rng = np.random.default_rng(0)
    for k in range(n):
        p = root / "val" / wnids[k % 10] / f"ILSVRC2012_val_{k:08d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)).save(p, quality=90)


def one_run(root: str, n: int, chunk: str, device: str) -> dict:
    """A run in this process; prints its peak memory."""
    import resource

    import torch

    import ctta
    from ctta import strategies
    from ctta.backbones import create

    torch.manual_seed(0)
    stream = ctta.streams.create("imagenet_c", data_root=root, corruptions="gaussian_noise", num_samples=n,
                                 batch_size=64)
    size = None if chunk == "auto" else (10 ** 9 if chunk == "whole" else int(chunk))
    t = time.perf_counter()
    ctta.run(stream, strategies.create("source", create("tiny_cnn", num_classes=1000)), device=device,
             progress=False, chunk_size=size)
    out = {"images": n, "chunk": chunk, "seconds": time.perf_counter() - t,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def throughput(root: str, n: int, device: str, model_name: str) -> dict:
    import torch

    import ctta
    from ctta.backbones import create

    dev = torch.device(device)
    stream = ctta.streams.create("imagenet_c", data_root=root, corruptions="gaussian_noise", num_samples=n,
                                 batch_size=64)
    seg = stream.segments[0]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for x, _, _ in seg.chunks(dev, chunk_size=256):
        pass
    sync()
    data = n / (time.perf_counter() - t)
    model = create(model_name, num_classes=1000).to(dev).eval()
    x = torch.rand(64, 3, 224, 224, device=dev)
    with torch.no_grad():
        model(x)
        sync()
        t, reps = time.perf_counter(), max(1, n // 64)
        for _ in range(reps):
            model(x)
        sync()
        model_only = reps * 64 / (time.perf_counter() - t)
        t = time.perf_counter()
        for xb, _ in seg.batches(dev, chunk_size=256):
            model(xb)
        sync()
        both = n / (time.perf_counter() - t)
    return {"images": n, "data_path_img_s": data, "model_img_s": model_only, "both_img_s": both,
            "model": model_name, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", type=int, default=256)
    ap.add_argument("--chunk", default="128")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--throughput-images", type=int, default=512)
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:
        print(json.dumps(one_run(a.root, int(a._one[0]), a._one[1], a._one[2])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_tree(root, 16 * a.base)
        print(f"# wrote {16 * a.base} JPEGs in {time.perf_counter() - t:.0f} s", flush=True)
        rows = []
        for chunk in ("auto", a.chunk, "whole"):
            for mult in (1, 4, 16):
                cmd = [sys.executable, __file__, "--root", str(root), "--_one", str(mult * a.base), chunk, a.device]
                res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if res.returncode:
                    print(res.stderr[-2000:], file=sys.stderr)
                    continue
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        print("| chunk | images | peak RSS (MB) | peak CUDA (MB) | seconds |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            cuda = f"{r['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in r else "-"
            print(f"| {r['chunk']} | {r['images']} | {r['peak_rss_mb']:.0f} | {cuda} | {r['seconds']:.1f} |")
        print(json.dumps(throughput(str(root), a.throughput_images, a.device, a.model)))


if __name__ == "__main__":
    main()
