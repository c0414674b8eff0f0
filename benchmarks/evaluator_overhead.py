"""Evaluator overhead on a synthetic loop: the same predict loop with and without the evaluator's per-step work
(SegmentAccumulator.update) and its per-segment finish + Recorder rows, on the CPU by default.

    python benchmarks/evaluator_overhead.py [--steps 200] [--batch 64] [--repeats 5] [--device cpu]

Prints the loop time with and without the evaluator and the overhead in %. Goal: under 2 % on a CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from ctta.backbones import create
from ctta.evaluation import Recorder, SegmentAccumulator


def loop(model, x_all, y_all, batch: int, evaluate: bool, steps_per_segment: int) -> float:
    recorder = Recorder(None, num_classes=10)
    t0 = time.perf_counter()
    acc = SegmentAccumulator()
    seg = 0
    with torch.no_grad():
        for k, i in enumerate(range(0, x_all.shape[0], batch)):
            logits = model(x_all[i:i + batch])
            if evaluate:
                acc.update(logits, y_all[i:i + batch])
            if (k + 1) % steps_per_segment == 0 and evaluate:
                recorder.add_segment(seg, f"d{seg}", "adapt", "domain", acc.finish(), 1.0)
                acc, seg = SegmentAccumulator(), seg + 1
    if x_all.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps-per-segment", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet20_cifar")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = create(a.backbone, num_classes=10).to(dev).eval()
    x = torch.rand(a.steps * a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.steps * a.batch,), device=dev)
    loop(model, x[:4 * a.batch], y[:4 * a.batch], a.batch, True, 2)  # warm-up
    plain, with_eval = [], []
    for _ in range(a.repeats):  # interleaved so that machine noise hits both alike
        plain.append(loop(model, x, y, a.batch, False, a.steps_per_segment))
        with_eval.append(loop(model, x, y, a.batch, True, a.steps_per_segment))
    b, e = min(plain), min(with_eval)
    print(f"{a.backbone}, {a.steps} steps of {a.batch} images on {dev}, best of {a.repeats}: "
          f"loop {b:.3f} s, with evaluator {e:.3f} s, overhead {100 * (e - b) / b:+.2f} %")
    # the evaluator's own cost measured directly (no model noise): update per step + finish/rows per segment
    logits = torch.randn(a.batch, 10, device=dev)
    labels = y[:a.batch]
    t0 = time.perf_counter()
    acc = SegmentAccumulator()
    rec = Recorder(None, num_classes=10)
    for k in range(a.steps):
        acc.update(logits, labels)
        if (k + 1) % a.steps_per_segment == 0:
            rec.add_segment(k, "d", "adapt", "domain", acc.finish(), 1.0)
            acc = SegmentAccumulator()
    t = time.perf_counter() - t0
    print(f"evaluator alone: {1e6 * t / a.steps:.1f} us per step = {100 * t / b:.2f} % of the plain loop")


if __name__ == "__main__":
    main()
