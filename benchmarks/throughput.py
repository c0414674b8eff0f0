"""Throughput and peak memory per strategy on the current device, the source model as the reference in the same run.

    python benchmarks/throughput.py --device cpu --batches 5
    python benchmarks/throughput.py --device cuda --batches 50 --backbone wrn28_10_cifar

Each strategy adapts on the same ``--batches`` batches of gaussian-noise images (batch 200, 32x32) after one
warm-up batch; the engine's cost meter gives images/s (device synchronised per segment) and peak memory.
Strategies that take ``source_data`` (psmt) get ``--source-data`` or, without it, the benchmark's own random images
(their one-off source work, e.g. PSMT's Fisher, falls in the warm-up batch).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import ctta
from ctta import backbones, strategies
from ctta.engine import resolve_device
from ctta.streams import Stream, tensor_segment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default="resnet20_cifar")
    p.add_argument("--strategies", default="source,bn,tent,cotta")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default=None, help="CSV to append the rows to")
    p.add_argument("--source-data", default=None, help="source train set for strategies that take source_data")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(a.device)
    g = torch.Generator().manual_seed(0)
    n = a.batch_size * a.batches
    x = (torch.rand(n + a.batch_size, 3, 32, 32, generator=g) + 0.3 * torch.randn(n + a.batch_size, 3, 32, 32,
                                                                                 generator=g)).clamp(0, 1)
    y = torch.randint(0, 10, (n + a.batch_size,), generator=g)
    stream = Stream("bench", [tensor_segment("warmup", "adapt", x[:a.batch_size], y[:a.batch_size], a.batch_size),
                              tensor_segment("timed", "adapt", x[a.batch_size:], y[a.batch_size:], a.batch_size)],
                    num_classes=10)
    if a.only:
        print(json.dumps(measure(a.only, a.backbone, stream, device, a.batches, a.batch_size,
                                 a.source_data or (x, y))))
        return
    # each strategy in a fresh process, so the CPU's peak-RSS figure is its own
    rows = []
    for name in a.strategies.split(","):
        cmd = [sys.executable, __file__, "--only", name, "--device", str(device), "--backbone", a.backbone,
               "--batches", str(a.batches), "--batch-size", str(a.batch_size)]
        if a.source_data:
            cmd += ["--source-data", a.source_data]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = rows[0]["images_per_s"]
    print(f"| strategy | images/s | ms/batch | x slower than {rows[0]['strategy']} | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['images_per_s']:.0f} | {r['ms_per_batch']:.0f} | "
              f"{ref / r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")
    print(f"device: {rows[0]['device']}; backbone {a.backbone}; batch {a.batch_size}; {a.batches} timed batches")
    if a.out:
        import pandas as pd

        out = Path(a.out)
        pd.DataFrame(rows).to_csv(out, mode="a", header=not out.exists(), index=False)


def measure(name: str, backbone: str, stream: Stream, device: torch.device, batches: int, batch_size: int,
            source_data: object = None) -> dict:
    """One strategy's images/s and peak memory on the timed segment (after a warm-up batch)."""
    torch.manual_seed(0)
    extra = {"source_data": source_data} if "source_data" in strategies.strategy_defaults(name) else {}
    s = strategies.create(name, backbones.create(backbone, num_classes=10), **extra)
    res = ctta.run(stream, s, device=device, progress=False)
    timed = res.segments.set_index("segment").loc["timed"]
    return {"strategy": name, "backbone": backbone, "device": device_name(device), "batch_size": batch_size,
            "images": batches * batch_size, "images_per_s": float(timed["images_per_s"]),
            "ms_per_batch": 1000 * float(timed["seconds"]) / batches,
            "peak_memory_mb": res.summary["peak_memory_mb"], "memory_kind": res.summary["memory_kind"],
            "date": time.strftime("%Y-%m-%d")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
