"""Agreement of our test-time methods with the reference benchmark's: same model, images, batches, order and seed.

The reference is not part of this repository: give the ``classification/`` folder of a checkout of
mariodoebler/test-time-adaptation with ``--reference`` (its imports need ``pip install yacs iopath einops`` and two
stand-in modules on the path: ``autoattack.py`` with ``class AutoAttack: pass`` and an empty ``webdataset.py``; pass
their folder with ``--stand-ins``). This script contains none of its code: it imports it from that path.

Each method of ``--methods`` runs twice over one continual stream, generated once by our engine
(``ctta.streams.corruption``) and held in memory: ours through ``ctta.strategies.create(name, model, seed=...)``
with its configured defaults, the reference's through its ``ADAPTATION_REGISTRY`` with its ``conf.py`` defaults
merged with its own CIFAR-10-C config:

    ours     reference class   reference config
    source   Source            cfgs/cifar10_c/source.yaml
    bn       BNTest            cfgs/cifar10_c/norm_test.yaml
    tent     Tent              cfgs/cifar10_c/tent.yaml
    cotta    CoTTA             cfgs/cifar10_c/cotta.yaml
    lame     LAME              cfgs/cifar10_c/lame.yaml
    bn_alpha BNAlpha           cfgs/cifar10_c/norm_alpha.yaml  (its TEST.BATCH_SIZE 1 replaced by ours, as for all)
    bn_ema   BNEMA             cfgs/cifar10_c/norm_ema.yaml
    sar      SAR               cfgs/cifar10_c/sar.yaml
    eta      EATA              cfgs/cifar10_c/eta.yaml
    eata     EATA              cfgs/cifar10_c/eata.yaml        (source images: ours, see below)
    rdumb    EATA              cfgs/cifar10_c/rdumb.yaml
    rpl      RPL               cfgs/cifar10_c/rpl.yaml
    roid     ROID              cfgs/cifar10_c/roid.yaml        (random augmentations: not bit-identical)
    deyo     DeYO              cfgs/cifar10_c/deyo.yaml        (tile shuffle drawn from a generator seeded alike)
    rmt      RMT               cfgs/cifar10_c/rmt.yaml         (source images: ours; view and projector drawn alike)
    rotta    RoTTA             cfgs/cifar10_c/rotta.yaml       (strong view drawn alike; its loss_calculation call fixed)
    cmf      CMF               cfgs/cifar10_c/cmf.yaml         (view drawn alike; its .cuda() prior made on the CPU)
    santa    SANTA             cfgs/cifar10_c/santa.yaml       (source images: ours; view and projector drawn alike)

Each side gets its own freshly loaded copy of the same backbone (the reference calls it as ``model(x)`` on [0, 1]
images, normalisation inside, as ours; LAME's side sees it through ``ReferenceView``, the layout its
``split_up_model`` expects), the same batches in the same order, and the same seed (the reference draws from the
global torch generator, seeded with ``--seed`` before each method, as its ``conf.py`` does with ``RNG_SEED``).

    python benchmarks/reference_agreement.py --reference /tmp/refagree/classification \\
        --stand-ins /tmp/refagree/stand --weights ../shared/models/resnet20-12fca82f.th \\
        --data-root ../shared/data/cifar10 --methods source,bn,tent,cotta,lame \\
        --corruptions gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression --num-samples 2000

EATA's Fisher: the reference's source loader (``get_source_loader``, which wants a torchvision CIFAR folder) is
replaced by the source images ours drew from ``--source-data`` (default: the ``--data-root`` train set; 2000 seeded
images in a seeded order), in the same batches. ``--reset-every N`` sets rdumb's reset interval on both sides (its
1000 is never reached by a 50-batch stream); ``--lr`` the learning rate of the gradient methods on both sides, ``--fisher-weight`` EATA's Fisher weight, ``--no-consistency``
ROID and CMF without their (randomly augmented) consistency term, ``--cmf-our-view`` CMF's reference with its view
made by our TTAAugment from the same draws, ``--rotta-our-view`` RoTTA's reference with its
strong view made by our augmentation code from the same draws (what remains is then everything but that code).

RMT's source loader (prototypes, warm-up, replay) is replaced by ours: the images ours drew from ``--source-data``
(``--rmt-source-samples`` of them, all by default) in ours' seeded order and batches, cycled (``get_source_loader`` and
``split_up_model``, which return our backbone's ``forward_features`` / ``forward_head``, are replaced in
``methods.rmt``); ``--rmt-warmup-samples`` sets its warm-up size on both sides; its checkpoint folder is a fresh
temporary one (it would load stale prototypes or warm-up weights); the global generator is seeded before its
constructor, so its projector gets the weights ours draws under ``torch.manual_seed(seed)``. ``--rmt-our-view``
(a diagnostic) makes the reference's augmented view with our ``TTAAugment`` (same seed and draw order), which
removes the pixel rounding of the two implementations of that view. SANTA goes the same way (its loader and split
replaced in ``methods.santa``; ``--santa-source-samples`` source images for its prototypes, a fresh checkpoint folder,
the generator seeded before its constructor; ``--santa-our-view`` the same diagnostic).

Prints, per method and corruption: the error of ours and of the reference, the share of identical argmaxes, the
batches whose outputs are bit-identical (LAME: compared as log Y) and the largest |output difference| (logits; LAME:
Y); then a summary with the mean over the stream. ``--steps`` sets the steps per batch of tent and cotta on both
sides; ``--dirichlet 0.01`` orders each domain's labels in long single-class runs.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

# our name -> (reference registry name, reference config file under cfgs/cifar10_c/)
REFERENCE = {
    "source": ("source", "source.yaml"),
    "bn": ("bntest", "norm_test.yaml"),
    "tent": ("tent", "tent.yaml"),
    "cotta": ("cotta", "cotta.yaml"),
    "lame": ("lame", "lame.yaml"),
    "bn_alpha": ("bnalpha", "norm_alpha.yaml"),
    "bn_ema": ("bnema", "norm_ema.yaml"),
    "sar": ("sar", "sar.yaml"),
    "eta": ("eata", "eta.yaml"),
    "eata": ("eata", "eata.yaml"),
    "rdumb": ("eata", "rdumb.yaml"),
    "rpl": ("rpl", "rpl.yaml"),
    "roid": ("roid", "roid.yaml"),
    "deyo": ("deyo", "deyo.yaml"),
    "rmt": ("rmt", "rmt.yaml"),
    "rotta": ("rotta", "rotta.yaml"),
    "cmf": ("cmf", "cmf.yaml"),
    "santa": ("santa", "santa.yaml"),
}

# methods whose learning rate --lr sets on both sides
WITH_LR = ("tent", "cotta", "sar", "eta", "eata", "rdumb", "rpl", "roid", "deyo", "rotta", "cmf")

# methods whose model resets itself: how to read our count of resets
RESETTING: Dict[str, Optional[Callable[[nn.Module], int]]] = {
    "sar": lambda s: int(s.recovery.recoveries),
    "rdumb": None,  # counted by wrapping our reset()
}


class _Body(nn.Module):
    """The backbone up to its last feature map (before pooling)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_feature_map(x)


class _Inner(nn.Module):
    """children: body, global average pool, linear head (the reference drops the last and appends a flatten)."""

    def __init__(self, net: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.body = _Body(net)
        self.pool = pool
        self.fc = net.linear

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


class ReferenceView(nn.Module):
    """Our Classifier seen in the layout the reference's ``split_up_model`` expects for a ResNet (LAME)."""

    def __init__(self, classifier: nn.Module, pool: str) -> None:
        super().__init__()
        self.normalize = classifier.normalize
        self.model = _Inner(classifier.net, nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else nn.AvgPool2d(8))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


def import_reference(ref_root: str, stand_ins: str):
    """The reference's ``conf`` module and ``ADAPTATION_REGISTRY``, imported from its folder."""
    sys.path[:0] = [p for p in (os.path.abspath(stand_ins) if stand_ins else "", ref_root) if p]
    cwd = os.getcwd()
    os.chdir(ref_root)  # the reference resolves some paths relative to its folder
    try:
        import conf  # noqa: E402  (the reference's)
        import methods  # noqa: F401,E402  registers its methods
        from utils.registry import ADAPTATION_REGISTRY  # noqa: E402
    finally:
        os.chdir(cwd)
    return conf, ADAPTATION_REGISTRY


def reference_cfg(conf, ref_root: str, method: str, args):
    """The reference's defaults merged with its CIFAR-10-C config for ``method``, at our batch size."""
    cfg = conf.cfg.clone()
    cfg.merge_from_file(os.path.join(ref_root, "cfgs", "cifar10_c", REFERENCE[method][1]))
    cfg.TEST.BATCH_SIZE = args.batch_size
    cfg.RNG_SEED = args.seed
    if method == "lame":
        cfg.MODEL.ARCH = "resnet20"  # split_up_model's ResNet branch: normalize + model.children()[:-1] + flatten
    if args.steps and method in ("tent", "cotta"):
        cfg.OPTIM.STEPS = args.steps
    if args.reset_every and method == "rdumb":
        cfg.MODEL.RESET_AFTER_NUM_UPDATES = args.reset_every
    if args.lr and method in WITH_LR:
        cfg.OPTIM.LR = args.lr
    if args.fisher_weight is not None and method == "eata":
        cfg.EATA.FISHER_ALPHA = args.fisher_weight
    if args.no_consistency and method in ("roid", "cmf"):
        cfg.ROID.USE_CONSISTENCY = False
    if method in ("rmt", "santa"):
        import tempfile

        cfg.CKPT_DIR = tempfile.mkdtemp(prefix=f"{method}_ckpt_")  # it loads prototypes / warm-up weights found there
        if args.rmt_warmup_samples >= 0:
            cfg.RMT.NUM_SAMPLES_WARM_UP = args.rmt_warmup_samples
    return cfg


def settings_line(method: str, cfg, ours, ref=None) -> str:
    """The hyperparameters each side runs with, for the log."""
    o = cfg.OPTIM
    if method == "tent":
        return (f"reference: {o.METHOD} lr {o.LR} beta {o.BETA} wd {o.WD} steps {o.STEPS}, batch {cfg.TEST.BATCH_SIZE}"
                f"; ours: Adam lr {ours.optimizer.defaults['lr']} betas {ours.optimizer.defaults['betas']} "
                f"wd {ours.optimizer.defaults['weight_decay']} steps {ours.steps}")
    if method == "cotta":
        return (f"reference: {o.METHOD} lr {o.LR} beta {o.BETA} wd {o.WD} steps {o.STEPS}, mt {cfg.M_TEACHER.MOMENTUM} "
                f"rst {cfg.COTTA.RST} ap {cfg.COTTA.AP} views {cfg.TEST.N_AUGMENTATIONS}, batch {cfg.TEST.BATCH_SIZE}"
                f"; ours: Adam lr {ours.optimizer.defaults['lr']} betas {ours.optimizer.defaults['betas']} "
                f"wd {ours.optimizer.defaults['weight_decay']} steps {ours.steps}, mt {ours.mt} rst {ours.rst} "
                f"ap {ours.ap} views {ours.views} (per chunk: {ours.views_per_chunk}), flip {ours.augment.cfg.hflip_p}")
    if method == "lame":
        return (f"reference: LAME {dict(cfg.LAME)}, batch {cfg.TEST.BATCH_SIZE}; ours: affinity={ours.affinity} "
                f"knn={ours.knn} force_symmetry={ours.force_symmetry} lambda={ours.bound_lambda} "
                f"max_steps={ours.max_steps} tol={ours.tol}")
    if method == "sar":
        g = ref.optimizer.param_groups[0]
        og = ours.optimizer.param_groups[0]
        return (f"reference: SAM(SGD) lr {g['lr']} momentum {g['momentum']} nesterov {g['nesterov']} rho {g['rho']} "
                f"E0 {ref.margin_e0:.4f} e_m {ref.reset_constant_em}, {len(ref.params)} tensors, batch "
                f"{cfg.TEST.BATCH_SIZE}; ours: SGD lr {og['lr']} momentum {og['momentum']} nesterov {og['nesterov']} "
                f"rho {ours.rho} E0 {ours.threshold:.4f} e_m {ours.recovery.reset_constant}, {len(ours.params)} tensors")
    if method in ("eta", "eata", "rdumb"):
        g, og = cfg.OPTIM, ours.optimizer.defaults
        src = (f", Fisher on {cfg.SOURCE.NUM_SAMPLES} source images in batches of {cfg.TEST.BATCH_SIZE}"
               if ref.fishers is not None else "")
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD}, E0 {ref.e_margin:.4f} d_margin "
                f"{ref.d_margin} fisher_alpha {ref.fisher_alpha}{src}, reset after {ref.reset_after_num_updates}, "
                f"batch {cfg.TEST.BATCH_SIZE}; ours: {type(ours.optimizer).__name__} lr {og['lr']} betas "
                f"{og.get('betas')} wd {og['weight_decay']}, E0 {ours.e0:.4f} d_margin {ours.d_margin} fisher_weight "
                f"{ours.fisher_weight}, reset_every {ours.reset_every}")
    if method == "rpl":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, q {ref.gce.q}, "
                f"{len(ref.params)} tensors, batch {cfg.TEST.BATCH_SIZE}; ours: {type(ours.optimizer).__name__} lr "
                f"{og['lr']} betas {og.get('betas')} wd {og['weight_decay']} steps {ours.steps}, q {ours.q}, "
                f"{len(ours.params)} tensors")
    if method == "roid":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.ROID)}, "
                f"{len(ref.params)} tensors, batch {cfg.TEST.BATCH_SIZE}; ours: {type(ours.optimizer).__name__} lr "
                f"{og['lr']} betas {og.get('betas')} wd {og['weight_decay']} steps {ours.steps}, weighting "
                f"{ours.use_weighting} prior correction {ours.use_prior_correction} consistency {ours.use_consistency} "
                f"momentum_src {ours.momentum_src} probs_momentum {ours.probs_momentum} temperature "
                f"{ours.temperature}, {len(ours.params)} tensors, augmentation {ours.augment.cfg}")
    if method == "deyo":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.DEYO)}, margin "
                f"{ref.deyo_margin:.4f} E0 {ref.margin_e0:.4f}, {len(ref.params)} tensors, batch {cfg.TEST.BATCH_SIZE}"
                f"; ours: {type(ours.optimizer).__name__} lr {og['lr']} betas {og.get('betas')} wd "
                f"{og['weight_decay']} steps {ours.steps}, PLPD {ours.plpd_threshold} margin {ours.margin:.4f} E0 "
                f"{ours.e0:.4f} aug {ours.aug} patch_len {ours.patch_len} reweight ent {ours.reweight_ent} plpd "
                f"{ours.reweight_plpd}, {len(ours.params)} tensors")
    if method == "rotta":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.ROTTA)}, EMA "
                f"momentum {ref.nu}, {len(ref.params)} tensors, batch {cfg.TEST.BATCH_SIZE}; ours: "
                f"{type(ours.optimizer).__name__} lr {og['lr']} betas {og.get('betas')} wd {og['weight_decay']}, memory "
                f"{ours.memory.capacity}, update every {ours.update_frequency}, nu {ours.nu}, alpha "
                f"{ours.rbn_layers[0].rbn_alpha}, lambda_t {ours.memory.lambda_t} lambda_u {ours.memory.lambda_u}, "
                f"{len(ours.params)} tensors, augmentation {ours.augment.cfg} ({ours.augment.draw_order} order)")
    if method == "rmt":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.RMT)}, "
                f"{dict(cfg.CONTRAST)}, mt {cfg.M_TEACHER.MOMENTUM}, {ref.warmup_steps} warm-up steps, "
                f"{len(ref.src_loader)} source batches of {ref.src_loader.batch_size}, batch {cfg.TEST.BATCH_SIZE}; "
                f"ours: {type(ours.optimizer).__name__} lr {og['lr']} betas {og.get('betas')} wd "
                f"{og['weight_decay']} steps {ours.steps}, lambdas src {ours.lambda_ce_src} trg {ours.lambda_ce_trg} "
                f"cont {ours.lambda_cont}, temperature {ours.temperature}, mt {ours.mt}, {ours.warmup_steps} warm-up "
                f"steps, {ours.source_images.shape[0]} source images in batches of {ours.source_batch}, "
                f"{len(ours.params)} + projector tensors, view {ours.augment.draw_order} order")
    if method == "santa":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.SANTA)}, "
                f"{dict(cfg.CONTRAST)}, AugCE alpha {ref.aug_entropy.alpha}, {len(ref.params)} + projector tensors, "
                f"{len(ref.src_loader)} source batches of {ref.src_loader.batch_size}, batch {cfg.TEST.BATCH_SIZE}; "
                f"ours: {type(ours.optimizer).__name__} lr {og['lr']} betas {og.get('betas')} wd "
                f"{og['weight_decay']} steps {ours.steps}, lambdas trg {ours.lambda_ce_trg} cont {ours.lambda_cont}, "
                f"alpha {ours.alpha}, temperature {ours.temperature}, {ours.source_images.shape[0]} source images in "
                f"batches of {ours.source_batch}, {len(ours.params)} + projector tensors, view "
                f"{ours.augment.draw_order} order")
    if method == "cmf":
        g, og = cfg.OPTIM, ours.optimizer.defaults
        return (f"reference: {g.METHOD} lr {g.LR} beta {g.BETA} wd {g.WD} steps {g.STEPS}, {dict(cfg.CMF)}, "
                f"{dict(cfg.ROID)}, q {ref.q:.4e}, {len(ref.params)} tensors, batch {cfg.TEST.BATCH_SIZE}; ours: "
                f"{type(ours.optimizer).__name__} lr {og['lr']} betas {og.get('betas')} wd {og['weight_decay']} steps "
                f"{ours.steps}, alpha {ours.alpha} gamma {ours.gamma} q {ours.q:.4e} beta in [{ours.beta_min}, "
                f"{ours.beta_max}), weighting {ours.use_weighting} prior correction {ours.use_prior_correction} "
                f"consistency {ours.use_consistency}, {len(ours.params)} tensors, view {ours.augment.draw_order} order")
    if method == "bn_alpha":
        return f"reference: BN.ALPHA {cfg.BN.ALPHA}, batch {cfg.TEST.BATCH_SIZE}; ours: alpha {ours.alpha}"
    if method == "bn_ema":
        momenta = sorted({m.momentum for m in ours.layers})
        return f"reference: the model's BatchNorm momentum, batch {cfg.TEST.BATCH_SIZE}; ours: momentum {momenta}"
    return f"reference: batch {cfg.TEST.BATCH_SIZE}; ours: no hyperparameters"


def _as_compared(method: str) -> Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(ours, reference) output -> the form compared bit for bit; and the form whose difference is reported."""
    if method == "lame":  # ours returns log Y clamped at the smallest normal float, the reference Y
        return (lambda t: t), (lambda t: t.clamp_min(torch.finfo(t.dtype).tiny).log())
    return (lambda t: t), (lambda t: t)


class _SourceBatches(list):
    """Labelled source batches standing in for the reference's source DataLoader (it reads ``batch_size``)."""

    batch_size = 0


class _Call(nn.Module):
    """A module calling ``fn`` (our backbone's ``forward_features`` or ``forward_head``), holding its model."""

    def __init__(self, model: nn.Module, fn: str) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model, self.fn)(x)


def _reference_source_inputs(ours, ref_model: nn.Module, cfg, method: str = "rmt") -> None:
    """RMT, SANTA: the reference's source loader becomes ours' images, order and batches; its model split ours."""
    from ctta.strategies.common import as_float_images

    b, images, labels = ours.source_batch, ours.source_images, ours.source_labels
    batches = _SourceBatches((as_float_images(images[i:i + b], "cpu"), labels[i:i + b])
                             for i in range(0, images.shape[0], b))
    batches.batch_size = b
    module = sys.modules[f"methods.{method}"]
    module.get_source_loader = lambda **kw: (None, batches)
    module.split_up_model = lambda model, arch, dataset: (_Call(model, "forward_features"),
                                                          _Call(model, "forward_head"))
    ref_model.model_preprocess = None  # read (and passed to the replaced loader) by the reference
    cfg.TEST.BATCH_SIZE = b  # its source batch (TEST.BATCH_SIZE); the test batches are ours anyway


def _compare_rmt_start(ours, ref) -> None:
    """RMT after step 0 on both sides: projector init, source prototypes, warmed-up student and teacher."""
    proj = all(torch.equal(a, b) for a, b in zip(ours.projector.state_dict().values(),
                                                 ref.projector.state_dict().values()))
    ours.ensure_ready(torch.device("cpu"))
    protos = ref.prototypes_src.squeeze(1)

    def gap(a: nn.Module, b: nn.Module) -> float:
        return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))

    print(f"RMT start: projector init bit-identical {proj}; prototypes bit-identical "
          f"{torch.equal(ours.prototypes, protos)} (max |difference| {float((ours.prototypes - protos).abs().max()):.1e})"
          f"; after the warm-up max |student difference| {gap(ours.model, ref.model):.1e}, teacher "
          f"{gap(ours.teacher, ref.model_ema):.1e}", flush=True)


def _compare_santa_start(ours, ref) -> None:
    """SANTA before the first test batch on both sides: projector init, source prototypes, anchor."""
    proj = all(torch.equal(a, b) for a, b in zip(ours.projector.state_dict().values(),
                                                 ref.projector.state_dict().values()))
    ours.ensure_ready(torch.device("cpu"))
    protos = ref.prototypes_src.squeeze(1)
    anchor = all(torch.equal(a, b) for a, b in zip(ours.anchor.parameters(), ref.anchor_model.parameters()))
    print(f"SANTA start: projector init bit-identical {proj}; prototypes bit-identical "
          f"{torch.equal(ours.prototypes, protos)} (max |difference| {float((ours.prototypes - protos).abs().max()):.1e})"
          f"; anchor weights bit-identical {anchor}", flush=True)


def build_reference(registry, method: str, cfg, model: nn.Module):
    """The reference's method object around ``model``, with the two fixes its code needs off CUDA at 8b2ed63: CMF
    puts its class-probability average on CUDA (``.cuda()``, made on the CPU here), RoTTA calls
    ``loss_calculation(x)``, which takes no argument outside CUDA autocast (called without it). A method not in
    ``REFERENCE`` (e.g. memo, adacontrast) is looked up under its own name."""
    cls = registry.get(REFERENCE[method][0] if method in REFERENCE else method)
    if method == "cmf":
        cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda t, *a, **k: t
        try:
            ref = cls(cfg=cfg, model=model, num_classes=10)
        finally:
            torch.Tensor.cuda = cuda
    else:
        ref = cls(cfg=cfg, model=model, num_classes=10)
    if method == "rotta":
        ref_loss = ref.loss_calculation
        ref.loss_calculation = lambda *_: ref_loss()
    return ref


def run_method(method: str, args, conf, registry, ref_root: str, domains, make_model) -> List[dict]:
    import ctta

    cfg = reference_cfg(conf, ref_root, method, args)
    overrides = {"steps": args.steps} if args.steps and method in ("tent", "cotta") else {}
    if method == "eata":
        overrides["source_data"] = args.source_data or args.data_root
    if method == "rmt":
        overrides["source_data"] = args.source_data or args.data_root
        overrides["source_samples"] = args.rmt_source_samples or None
        if args.rmt_warmup_samples >= 0:
            overrides["warmup_samples"] = args.rmt_warmup_samples
    if method == "santa":
        overrides["source_data"] = args.source_data or args.data_root
        overrides["source_samples"] = args.santa_source_samples or None
    if args.reset_every and method == "rdumb":
        overrides["reset_every"] = args.reset_every
    if args.lr and method in WITH_LR:
        overrides["lr"] = args.lr
    if args.fisher_weight is not None and method == "eata":
        overrides["fisher_weight"] = args.fisher_weight
    if args.no_consistency and method in ("roid", "cmf"):
        overrides["use_consistency"] = False
    ours = ctta.strategies.create(method, make_model(), seed=args.seed, **overrides)
    ref_model = make_model()
    if method == "lame":
        ref_model = ReferenceView(ref_model.eval(), args.pool)
    if method == "eata":  # the reference's Fisher loader replaced by ours: the same source images, order and batches
        from ctta.strategies.common import as_float_images

        images, b = ours.source_images, ours.fisher_batch
        batches = [(as_float_images(images[i:i + b], "cpu"), None) for i in range(0, images.shape[0], b)]
        sys.modules["methods.eata"].get_source_loader = lambda **kw: (None, batches)
        ref_model.model_preprocess = None  # read (and passed to the replaced loader) by the reference
        cfg.TEST.BATCH_SIZE = b  # its Fisher batch (what it passes to the loader)
    if method in ("rmt", "santa"):
        _reference_source_inputs(ours, ref_model, cfg, method)
        torch.manual_seed(args.seed)  # its projector's init: ours draws it under torch.manual_seed(seed)
    ref = build_reference(registry, method, cfg, ref_model)
    if method == "rmt":
        _compare_rmt_start(ours, ref)
        if args.rmt_our_view:  # diagnostic: the reference's view made by our TTAAugment (same seed, same draws)
            from ctta.strategies.common import AugmentConfig, TTAAugment

            view = TTAAugment(AugmentConfig(), seed=args.seed, draw_order="torchvision")
            ref.tta_transform = lambda x: view(x, 1)
    if method == "santa":
        _compare_santa_start(ours, ref)
        if args.santa_our_view:  # diagnostic: the reference's view made by our TTAAugment (same seed, same draws)
            from ctta.strategies.common import AugmentConfig, TTAAugment

            view = TTAAugment(AugmentConfig(), seed=args.seed, draw_order="torchvision")
            ref.tta_transform = lambda x: view(x, 1)
    if method == "cmf" and args.cmf_our_view:  # diagnostic: its view made by our TTAAugment (same seed, same draws)
        from ctta.strategies.common import AugmentConfig, TTAAugment

        view = TTAAugment(AugmentConfig(padding="reflect", blur=False, noise_std=0.0), seed=args.seed,
                          draw_order="torchvision")
        ref.tta_transform = lambda x: view(x, 1)
    if method == "rotta" and args.rotta_our_view:  # its strong view made by our augmentation code, drawn alike
        from ctta.strategies.common import AugmentConfig, TTAAugment

        view = TTAAugment(AugmentConfig(), seed=args.seed, draw_order="torchvision")
        ref.transform = lambda images: view(images, 1)
    print(f"\n### {method}: {settings_line(method, cfg, ours, ref)}", flush=True)
    ours_form, ref_form = _as_compared(method)
    ref_resets, ours_resets = [0], [0]
    if method in RESETTING and RESETTING[method] is None:
        ours_reset = ours.reset

        def counted_ours_reset():
            ours_resets[0] += 1
            ours_reset()

        ours.reset = counted_ours_reset
    if method in RESETTING:  # count the reference's model resets (SAR's recovery, RDumb's periodic reset)
        ref_reset = ref.reset

        def counted_reset():
            ref_resets[0] += 1
            ref_reset()

        ref.reset = counted_reset
    # the reference draws from the global generators, seeded as its conf.py does
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    try:
        import numpy as np

        np.random.seed(args.seed)
    except ImportError:  # pragma: no cover
        pass
    rows = []
    print("| corruption | images | ours error % | reference error % | difference (points) | identical argmax % | "
          "bit-identical outputs (batches) | max abs(output difference) | s ours / s reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, x_all, y_all in domains:
        n = err_ours = err_ref = same = identical = batches = 0
        max_diff = 0.0
        t_ours = t_ref = 0.0
        for start in range(0, len(y_all), args.batch_size):
            x, y = x_all[start:start + args.batch_size], y_all[start:start + args.batch_size]
            t0 = time.perf_counter()
            out_ours = ours_form(ours.adapt(x).detach())
            t1 = time.perf_counter()
            out_ref = ref([x]).detach()
            t2 = time.perf_counter()
            t_ours, t_ref = t_ours + t1 - t0, t_ref + t2 - t1
            cmp_ref = ref_form(out_ref)
            a_ours, a_ref = out_ours.argmax(1), out_ref.argmax(1)
            n += len(y)
            batches += 1
            err_ours += int((a_ours != y).sum())
            err_ref += int((a_ref != y).sum())
            same += int((a_ours == a_ref).sum())
            identical += int(torch.equal(out_ours, cmp_ref))
            diff = (out_ours.exp() - cmp_ref.exp()) if method == "lame" else (out_ours - out_ref)
            max_diff = max(max_diff, float(diff.abs().max()))
        row = dict(method=method, corruption=name, n=n, err_ours=err_ours, err_ref=err_ref, same=same,
                   identical=identical, batches=batches, max_diff=max_diff, t_ours=t_ours, t_ref=t_ref)
        rows.append(row)
        print(f"| {name} | {n} | {100 * err_ours / n:.2f} | {100 * err_ref / n:.2f} | "
              f"{100 * (err_ours - err_ref) / n:+.2f} | {100 * same / n:.2f} | {identical}/{batches} | "
              f"{max_diff:.1e} | {t_ours:.0f} / {t_ref:.0f} |", flush=True)
    n = sum(r["n"] for r in rows)
    eo, er = sum(r["err_ours"] for r in rows), sum(r["err_ref"] for r in rows)
    print(f"| mean | {n} | {100 * eo / n:.2f} | {100 * er / n:.2f} | {100 * (eo - er) / n:+.2f} | "
          f"{100 * sum(r['same'] for r in rows) / n:.2f} | {sum(r['identical'] for r in rows)}/"
          f"{sum(r['batches'] for r in rows)} | {max(r['max_diff'] for r in rows):.1e} | "
          f"{sum(r['t_ours'] for r in rows):.0f} / {sum(r['t_ref'] for r in rows):.0f} |", flush=True)
    if method == "eata" and ours.fisher is not None and ref.fishers is not None:
        diff = max(float((ours.fisher[k] - ref.fishers[k][0]).abs().max()) for k in ours.fisher)
        top = max(float(v.abs().max()) for v in ours.fisher.values())
        same = all(torch.equal(ours.fisher[k], ref.fishers[k][0]) for k in ours.fisher)
        print(f"Fisher: {len(ours.fisher)} / {len(ref.fishers)} tensors, bit-identical {same}, max |difference| "
              f"{diff:.1e} (largest value {top:.1e})", flush=True)
    if method == "cmf":
        twins = [h for h, p in zip(ref.hidden_model.parameters(), ref.model.parameters()) if p.requires_grad]
        hidden_gap = max(float((h - r).abs().max()) for h, r in zip(ours.hidden, twins))
        student_gap = max(float((p.detach() - r.detach()).abs().max()) for p, r in zip(ours.params, ref.params))
        print(f"CMF filter: variance ours {ours.variance:.6e}, reference {ref.hidden_var:.6e}; beta ours "
              f"{ours.last_beta:.6f}, reference {ref.beta:.6f}; max |difference| hidden {hidden_gap:.1e}, "
              f"student {student_gap:.1e}", flush=True)
    if method == "rotta":
        print(f"updates: ours {ours.updates}, reference {ref.current_instance // ref.update_frequency}; memory per "
              f"class: ours {ours.memory.per_class_counts()}, reference {ref.mem.per_class_dist()}", flush=True)
    if method in RESETTING:
        count = RESETTING[method]
        print(f"model resets: ours {count(ours) if count else ours_resets[0]}, reference {ref_resets[0]}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="", help="folder with autoattack.py / webdataset.py stand-ins")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backbone", default="resnet20_cifar")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--methods", default="source,bn,tent,cotta,lame",
                    help=f"comma-separated, from {', '.join(REFERENCE)}")
    ap.add_argument("--corruptions", default="gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--num-samples", type=int, default=2000, help="images per corruption")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1, help="stream sampling, our strategies' seed, the reference's RNG")
    ap.add_argument("--steps", type=int, default=0, help="steps per batch of tent and cotta, both sides (0: configs)")
    ap.add_argument("--lr", type=float, default=0.0,
                    help=f"learning rate of {', '.join(WITH_LR)}, both sides (0: their configs)")
    ap.add_argument("--fisher-weight", type=float, default=None,
                    help="eata's Fisher weight (EATA.FISHER_ALPHA), both sides (default: its config's 1.0)")
    ap.add_argument("--no-consistency", action="store_true",
                    help="roid and cmf without their consistency loss (the only random part), both sides")
    ap.add_argument("--rotta-our-view", action="store_true",
                    help="diagnostic: rotta's reference with its strong view made by our TTAAugment (same draws)")
    ap.add_argument("--cmf-our-view", action="store_true",
                    help="diagnostic: cmf's reference with its consistency view made by our TTAAugment (same draws)")
    ap.add_argument("--reset-every", type=int, default=0,
                    help="rdumb's steps between resets, both sides (0: its config's 1000)")
    ap.add_argument("--source-data", default="",
                    help="eata's source train set (ours reads it; the reference gets the same images); default: "
                         "--data-root")
    ap.add_argument("--rmt-source-samples", type=int, default=0,
                    help="rmt's source images (ours draws them from --source-data, the reference gets the same); "
                         "0: all")
    ap.add_argument("--rmt-warmup-samples", type=int, default=-1,
                    help="rmt's warm-up samples (RMT.NUM_SAMPLES_WARM_UP), both sides; -1: its config's 50000")
    ap.add_argument("--rmt-our-view", action="store_true",
                    help="diagnostic: the reference's augmented view made by our TTAAugment (pixel rounding removed)")
    ap.add_argument("--santa-source-samples", type=int, default=0,
                    help="santa's source images for its prototypes (ours draws them from --source-data, the reference "
                         "gets the same); 0: all")
    ap.add_argument("--santa-our-view", action="store_true",
                    help="diagnostic: santa's reference with its augmented view made by our TTAAugment (same draws)")
    ap.add_argument("--dirichlet", type=float, default=0.0,
                    help="temporally correlated labels (label_shift dirichlet with this delta); 0: i.i.d. order")
    ap.add_argument("--pool", choices=("adaptive", "avg8"), default="adaptive",
                    help="LAME's reference-side pooling module (avg8: its WideResNet branch's AvgPool2d(8))")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REFERENCE]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(REFERENCE)}")
    torch.set_num_threads(args.threads)

    import ctta

    ref_root = os.path.abspath(args.reference)
    conf, registry = import_reference(ref_root, args.stand_ins)

    def make_model() -> nn.Module:
        return ctta.backbones.create(args.backbone, weights=args.weights).eval()

    t0 = time.time()
    stream = ctta.streams.corruption("cifar10", root=args.data_root, severity=args.severity,
                                     corruptions=args.corruptions, num_samples=args.num_samples,
                                     batch_size=args.batch_size, seed=args.seed, clean_eval=False,
                                     label_shift={"kind": "dirichlet", "delta": args.dirichlet} if args.dirichlet
                                     else None)
    domains = []
    for seg in stream.segments:
        if seg.role == "domain":
            x_all, y_all = seg.load(torch.device("cpu"))
            domains.append((seg.name, x_all, y_all))
    print(f"stream: {len(domains)} domains x {args.num_samples} images, severity {args.severity}, batch "
          f"{args.batch_size}, seed {args.seed}, continual order ({time.time() - t0:.0f} s to generate)", flush=True)

    source = make_model()
    src_err: Dict[str, Tuple[int, int]] = {}
    with torch.no_grad():
        for name, x_all, y_all in domains:
            wrong = sum(int((source(x_all[i:i + args.batch_size]).argmax(1) != y_all[i:i + args.batch_size]).sum())
                        for i in range(0, len(y_all), args.batch_size))
            src_err[name] = (wrong, len(y_all))

    all_rows = {m: run_method(m, args, conf, registry, ref_root, domains, make_model) for m in methods}

    names = [d[0] for d in domains]
    print("\n### Summary: online error % ours / reference (identical argmax %)")
    print("| method | " + " | ".join(names) + " | mean | difference (points) | identical argmax % |")
    print("| --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |")
    n_all = sum(v[1] for v in src_err.values())
    print("| source model (eval) | " + " | ".join(f"{100 * src_err[c][0] / src_err[c][1]:.2f}" for c in names)
          + f" | {100 * sum(v[0] for v in src_err.values()) / n_all:.2f} | | |")
    for m, rows in all_rows.items():
        n = sum(r["n"] for r in rows)
        eo, er = sum(r["err_ours"] for r in rows), sum(r["err_ref"] for r in rows)
        cells = [f"{100 * r['err_ours'] / r['n']:.2f} / {100 * r['err_ref'] / r['n']:.2f}" for r in rows]
        print(f"| {m} | " + " | ".join(cells) + f" | {100 * eo / n:.2f} / {100 * er / n:.2f} | "
              f"{100 * (eo - er) / n:+.2f} | {100 * sum(r['same'] for r in rows) / n:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
