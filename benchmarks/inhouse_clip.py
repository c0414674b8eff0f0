"""Train a small CLIP-style model in house on clean CIFAR-10 train images (CPU, minutes), as an offline ViL teacher.

No pretrained CLIP weights are reachable offline, so ViLAaD / clip_zeroshot can only be exercised at small scale with
a teacher trained here. What it is:
- Model: open_clip's ``CLIP`` class with a custom config (:data:`CONFIG`): image tower a 4-layer ViT, width 96,
  3 heads, 8 x 8 patches on 32 x 32 inputs (16 tokens); text tower a 2-layer transformer, width 64, 2 heads,
  context 16, open_clip's bundled BPE tokenizer; 64-d joint embedding; learnable logit scale (init 1/0.07, capped
  at 100). Both towers are trained from random initialisation.
- Objective: CLIP's symmetric InfoNCE between the batch's image embeddings and the text embeddings of one caption
  per image, the caption being a random OpenAI ImageNet prompt template (open_clip's 80
  ``OPENAI_IMAGENET_TEMPLATES``) filled with the image's CIFAR-10 class name. With 10 classes a batch holds many
  captions of the same class, which InfoNCE treats as negatives (CLIP's own false negatives, much more frequent
  here); we keep the plain objective.
- Data: the shared CIFAR-10 *train* split (50k images; ``load_cifar(..., train=True)``), never the test split.
- Augmentations (generic, no target corruption): random crop (4 px reflect padding), horizontal flip, colour
  jitter (brightness / contrast / saturation factors in [0.6, 1.4]), and, on half of the batches, half of the
  images get one corruption from :data:`EXTRA_CORRUPTIONS` at a random severity 1-5
  (``ctta.streams.corruptions.corrupt``): defocus, glass, motion, zoom and gaussian blur, snow, frost, fog,
  brightness, contrast, elastic transform, pixelate, spatter, saturate. Excluded: the noise family (gaussian, shot,
  impulse, speckle noise: gaussian_noise is the SFDA target) and jpeg_compression (too slow on a CPU budget).
  This imitates CLIP's broad training distribution a little; it is not a held-out-corruption guarantee (spatter
  and glass blur do perturb high frequencies).
- Optimiser: AdamW (lr 2e-3, weight decay 0.05 on matrices only), batch 128, linear warm-up 200 steps then cosine
  decay over ``--steps`` or ``--max-minutes``, whichever runs out first (the schedule follows the larger fraction
  done, so a busy CPU still gets a fully decayed run; logged when the time budget ends it).

The checkpoint (default ``~/.cache/ctta-bench/models/inhouse_clip_cifar10.pt``) is the format the ``clip``
backbone reads with ``checkpoint=PATH`` (``{"format": "ctta-open-clip", "config": ..., "state_dict": ...}``):
``ctta.backbones.create("clip", num_classes=10, checkpoint=PATH, class_names="cifar10", templates="simple")``.

Usage: ``python benchmarks/inhouse_clip.py [--steps 2400] [--max-minutes 12] [--out PATH]`` (one CPU thread).
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("inhouse_clip")

CONFIG = {"embed_dim": 64,
          "vision_cfg": {"layers": 4, "width": 96, "head_width": 32, "patch_size": 8, "image_size": 32},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
EXTRA_CORRUPTIONS = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog",
                     "brightness", "contrast", "elastic_transform", "pixelate", "spatter", "saturate")
DEFAULT_OUT = Path("~/.cache/ctta-bench/models/inhouse_clip_cifar10.pt").expanduser()


def augment(x: torch.Tensor, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
    """Random crop + flip + colour jitter on float images in [0, 1]; on half the batches, other corruptions on half."""
    from ctta.streams.corruptions import corrupt

    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    off = torch.randint(0, 9, (n, 2), generator=gen).tolist()
    x = torch.stack([padded[i, :, a:a + 32, b:b + 32] for i, (a, b) in enumerate(off)])
    flip = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    b, c, s = (0.6 + 0.8 * torch.rand(3, n, 1, 1, 1, generator=gen)).unbind(0)
    x = (x * b).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = (gray + (x - gray) * s).clamp(0, 1)
    if rng.random() < 0.5:
        half = n // 2
        name = rng.choice(EXTRA_CORRUPTIONS)
        x = x.clone()
        x[:half] = corrupt(x[:half].contiguous(), name, rng.randint(1, 5), seed=rng.randrange(1 << 30))
    return x


def build(config: dict = CONFIG):
    """A randomly initialised open_clip ``CLIP`` with ``config`` and the matching tokenizer."""
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    net = CLIP(embed_dim=config["embed_dim"], vision_cfg=dict(config["vision_cfg"]), text_cfg=dict(config["text_cfg"]))
    return net, SimpleTokenizer(context_length=config["text_cfg"]["context_length"])


@torch.no_grad()
def zero_shot_accuracy(net, tokenizer, images: torch.Tensor, labels: torch.Tensor, names, templates) -> float:
    """Zero-shot top-1 accuracy of ``net`` (eval mode) on float images in [0, 1]."""
    from ctta.backbones.clip import CLIP_MEAN, CLIP_STD, class_text_features

    text = class_text_features(net, tokenizer, names, templates)
    was = net.training
    net.eval()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    correct = 0
    for i in range(0, images.shape[0], 256):
        f = F.normalize(net.encode_image((images[i:i + 256] - mean) / std), dim=-1)
        correct += int(((f @ text.t()).argmax(1) == labels[i:i + 256]).sum())
    net.train(was)
    return correct / images.shape[0]


def train(args: argparse.Namespace) -> Path:
    from open_clip import zero_shot_metadata as meta

    from ctta.backbones.clip import CLIP_MEAN, CLIP_STD
    from ctta.streams.corruptions import corrupt
    from ctta.streams.datasets import load_cifar

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = load_cifar("cifar10", args.data_root, train=True)
    test = load_cifar("cifar10", args.data_root, train=False)
    names = [n.replace("_", " ") for n in data.classes]
    train_templates = [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    eval_templates = [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    net, tokenizer = build()
    # all captions tokenised once: (class, template) -> tokens
    captions = torch.stack([tokenizer([t.format(n) for t in train_templates]) for n in names])  # C x T x L
    decay_p = [p for p in net.parameters() if p.dim() >= 2]
    other_p = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay_p, "weight_decay": 0.05}, {"params": other_p, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    n_train = data.images.shape[0]
    start = time.time()
    net.train()
    step, seen = 0, 0
    perm = torch.randperm(n_train, generator=gen)
    pos = 0
    for step in range(args.steps):
        if time.time() - start > 60 * args.max_minutes:
            log.warning("stopping at step %d of %d: the %.1f-minute budget is spent", step, args.steps,
                        args.max_minutes)
            break
        if pos + args.batch_size > n_train:
            perm, pos = torch.randperm(n_train, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        x = augment(data.images[idx].float() / 255.0, gen, rng)
        y = data.labels[idx].long()
        tmpl = torch.randint(0, len(train_templates), (len(idx),), generator=gen)
        tokens = captions[y, tmpl]
        warm = min(1.0, (step + 1) / args.warmup)
        # cosine over whichever runs out first, the steps or the time budget (a shared CPU is slower than planned)
        progress = min(1.0, max(step / args.steps, (time.time() - start) / (60 * args.max_minutes)))
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        img = F.normalize(net.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(net.encode_text(tokens), dim=-1)
        logits = net.logit_scale.exp() * img @ txt.t()
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        seen += len(idx)
        if step % 200 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.3f scale %.1f lr %.2e %.0f img/s", step, args.steps, float(loss.detach()),
                     float(net.logit_scale.detach().exp()), lr, seen / (time.time() - start))
    minutes = (time.time() - start) / 60
    n_eval = args.eval_images
    pick = torch.randperm(test.images.shape[0], generator=torch.Generator().manual_seed(0))[:n_eval]  # class-sorted
    clean = test.images[pick].float() / 255.0
    labels = test.labels[pick].long()
    acc_clean = zero_shot_accuracy(net, tokenizer, clean, labels, names, eval_templates)
    noisy = corrupt(clean, "gaussian_noise", 5)
    acc_noise = zero_shot_accuracy(net, tokenizer, noisy, labels, names, eval_templates)
    log.info("trained %d steps (%d images, %.1f epochs) in %.1f min; zero-shot accuracy on %d random test images: "
             "clean %.1f %%, gaussian_noise-5 %.1f %%", step + 1, seen, seen / n_train, minutes, n_eval, 100 * acc_clean,
             100 * acc_noise)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "ctta-open-clip", "config": CONFIG, "state_dict": net.state_dict(),
                "meta": {"steps": step + 1, "images_seen": seen, "minutes": round(minutes, 1),
                         "zero_shot_clean": acc_clean, "zero_shot_gaussian_noise_5": acc_noise,
                         "train_templates": "openai", "extra_corruptions": list(EXTRA_CORRUPTIONS),
                         "seed": args.seed}}, out)
    log.info("saved %s", out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="/work/shared/data/cifar10")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(p.parse_args())


if __name__ == "__main__":
    main()
