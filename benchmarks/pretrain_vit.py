"""Upstream pretraining of a small ViT on CIFAR-10 images that a class-incremental run will not see.

The ViT methods (LAE, CoSO, SimpleCIL, FSA on a ViT) assume a pretrained, frozen backbone; the papers use
ImageNet-21k ViT-B/16 weights, which cannot be downloaded here. This script gives the closest honest stand-in that
runs on a CPU in minutes: a small timm ViT trained with labels on the CIFAR-10 train images that the Split CIFAR-10
stream (``cifar10_ci`` with ``train_per_class``, for each of the stream seeds given) leaves out, so no training image of the
continual-learning run is seen upstream. It knows the 10 classes (as ImageNet-21k knows CIFAR's), which flatters
frozen-backbone methods exactly as a large pretrained model does; the README of the figure says so.

    python benchmarks/pretrain_vit.py --out ~/.cache/ctta-bench/models/vit_cifar_small.pt
    ctta-bench --stream cifar10_ci --strategy lae --backbone vit_tiny_patch16_224 \\
        --set backbone.img_size=32 --set backbone.patch_size=8 --set backbone.depth=4 \\
        --set backbone.embed_dim=128 --set backbone.num_heads=4 --weights ~/.cache/ctta-bench/models/vit_cifar_small.pt
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ctta.backbones import create
from ctta.seeding import stable_seed
from ctta.streams.datasets import load_cifar
from ctta.streams.incremental import class_indices

log = logging.getLogger("pretrain_vit")

VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=128, num_heads=4)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel reflect padding) and horizontal flip, batched."""
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 3, h, w + 8)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data/cifar10")
    ap.add_argument("--out", required=True)
    ap.add_argument("--exclude-per-class", type=int, default=1000, help="the CL stream's train_per_class")
    ap.add_argument("--stream-seeds", default="0,1,2",
                    help="the CL stream seeds whose train subsets are excluded (the CLI's --seed sets the stream's)")
    ap.add_argument("--per-class", type=int, default=2000, help="upstream images per class (from the rest)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train = load_cifar("cifar10", args.data_root, train=True)
    test = load_cifar("cifar10", args.data_root, train=False)
    seeds = [int(v) for v in str(args.stream_seeds).split(",") if v.strip()]
    taken = torch.cat([class_indices(train, range(10), args.exclude_per_class, s, "train") for s in seeds]).unique()
    free = torch.ones(len(train.labels), dtype=torch.bool)
    free[taken] = False
    g = torch.Generator().manual_seed(stable_seed(0, "upstream"))
    keep = []
    for c in range(10):
        members = torch.nonzero(free & (train.labels == c)).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:args.per_class]])
    idx = torch.cat(keep)
    assert not set(idx.tolist()) & set(taken.tolist())
    x_all, y_all = train.images[idx], train.labels[idx]
    log.info("upstream set: %d images (%d per class), disjoint from the %d train images of the streams with seeds %s",
             len(idx), args.per_class, len(taken), seeds)

    model = create("vit_tiny_patch16_224", num_classes=10, **VIT).train()
    steps = args.epochs * (len(idx) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    bar = tqdm(total=steps, desc="pretrain")
    for _ in range(args.epochs):
        perm = torch.randperm(len(idx), generator=g)
        for b in range(len(idx) // args.batch_size):
            sel = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = augment(x_all[sel].float() / 255 if x_all.dtype == torch.uint8 else x_all[sel], g)
            loss = F.cross_entropy(model(x), y_all[sel].long(), label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in range(0, len(test.labels), 500):
            xb = test.images[b:b + 500]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
            correct += int((model(xb).argmax(1) == test.labels[b:b + 500].long()).sum())
    acc = correct / len(test.labels)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.net.state_dict(), "vit": VIT, "test_accuracy": acc}, out)
    log.info("test accuracy %.1f %% after %.0f s; saved %s", 100 * acc, time.time() - t0, out)


if __name__ == "__main__":
    main()
