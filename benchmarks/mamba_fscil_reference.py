"""Agreement of our ``mamba_fscil`` with the official Mamba-FSCIL code (xiaojieli0903/Mamba-FSCIL@f253969:
``mmfscil/models/mamba_ffn_neck.py`` ``MambaNeck``, ``mmfscil/models/classifier.py`` ``ImageClassifierCIL``,
``mmfscil/models/ETFHead.py``, ``mmfscil/apis/fscil.py`` ``fscil``), on the same backbone weights, projector weights,
ETF, images, batches, batch order, mixup draws and seed.

The reference is not part of this repository: ``--reference`` is the root of a checkout at f253969 (holding
``mmfscil/``, ``mmcls/``, ``configs/``) and ``--mamba`` the root of a state-spaces/mamba checkout at v1.2.0.post1 (the
version its README installs); this script contains none of their code. Run it in a venv with mmcv 1.7.0 (pure Python:
``MMCV_WITH_OPS=0 pip install --no-build-isolation mmcv==1.7.0``; the reference's vendored mmcls accepts <= 1.7.0),
einops, rope, yapf 0.40.1, matplotlib, and our package importable.

Stand-ins (everything else is the reference's code):

- ``selective_scan_cuda`` (imported at the top of ``ss2d.py`` and of mamba's ``selective_scan_interface.py``): an
  empty module; ``mamba_ssm.ops.selective_scan_interface``: mamba v1.2.0.post1's file imported from its path, with
  ``selective_scan_fn`` = that file's pure-PyTorch ``selective_scan_ref`` (the CUDA kernel's reference), so the scan
  is official code; ``mamba_ssm.models.mixer_seq_simple`` / ``mamba_ssm.modules.mamba_simple`` (imported by the
  reference's vendored ``mamba_ssm/__init__.py`` for names it never uses): placeholders. ``causal_conv1d`` absent:
  the reference's ``Mamba`` takes its own non-fused path (conv1d + scan), the one that returns the gate and params.
- the backbone: a registered ``SharedBackbone`` holding a copy of our initial network; it returns its last feature
  map average-pooled to 2x2 (as our ``tokens=map, grid=2``; the official ResNet-12 gives 2x2 natively).
- the data: a registered ``SharedFSCILDataset`` serving our stream's tensors (its pipeline is not applied: the
  stream's images are the inputs on both sides): the base session's images (``few_cls=None``), a session's few-shot
  images (``few_cls``) and the test images (``subset='test'``), with ``cls_id`` / ``img_id`` metas.
- distribution / device: a one-process gloo group (world size 1) so that the reference's ``dist.all_reduce`` /
  ``all_gather_object`` calls run; ``wrap_non_distributed_model`` -> ``MMDataParallel`` without devices (the CPU
  path: mmcls leaves the model unwrapped on CPU, where ``fscil`` needs ``.module``); ``build_dataloader`` with 0
  workers.
- randomness of the incremental sessions: the shuffled loader (``shuffle=True, drop_last=True``, batch 8), the
  feature-mixup coin (``np.random.random``) and partner (``torch.randperm``) draw from a replica of our generator
  (``stable_seed(seed, "mamba_fscil_inc", session)``) in our order of draws (the official: torch's / NumPy's global
  generators), the dataset mapped onto our order of its items (ours: session features, then class means by class id).
- base session: driven per batch as mmcv's ``EpochBasedRunner`` does (``train_step``, ``zero_grad``, ``backward``,
  ``step``) on our stream's batches, SGD at our constant lr (the official schedule has warm-up + cosine over known
  epochs; our stream has no known length), no image mixup / cutmix (``train_cfg=None``; ours has none).

Checks: (1) the neck (base branch, novel branch with a random gate, output, gate ``z``, scan parameters) on the same
weights and input; (2) the class-sensitive losses on the same features; (3) one incremental training step's parameter
update; (``--ddp N``) one step of the reference on N gloo processes of 8 samples (DDP) against ours with
``loss_chunk=8``; (4) the whole run: base session, then ``fscil`` (its own memories, loop, schedule, evaluation),
all / base / novel accuracy per session on both sides, the reference once with its own base session and once from
our weights at the end of ours; (``--noise-floor``) ours against itself from weights perturbed by 1e-6. Each for our
``gate_flip`` values (``channels``: as the official code). Usage::

    OMP_NUM_THREADS=1 python benchmarks/mamba_fscil_reference.py --reference /tmp/mfs_ref --mamba /tmp/mamba_v120 \\
        --components-only --ddp 2
    OMP_NUM_THREADS=1 python benchmarks/mamba_fscil_reference.py --reference /tmp/mfs_ref --mamba /tmp/mamba_v120 \\
        --skip-components --d-state 16 --grad-clip 1.0 --seeds 0 1 --noise-floor
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

BASE, WAYS, SHOTS, K = 6, 2, 5, 10


# --- the reference, imported from its checkout ------------------------------------------------------------------------
def install_reference(root: str, mamba_root: str, rank: int = 0, world: int = 1, port: int = 0) -> None:
    """Stand-ins for the CUDA extensions and mamba_ssm's package, then the reference's packages on sys.path."""
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    path = os.path.join(mamba_root, "mamba_ssm", "ops", "selective_scan_interface.py")
    spec = importlib.util.spec_from_file_location("_mamba_selective_scan_interface", path)
    ssi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ssi)
    mods: Dict[str, types.ModuleType] = {}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.models", "mamba_ssm.modules"):
        mods[name] = types.ModuleType(name)
        mods[name].__path__ = []
    iface = mods["mamba_ssm.ops.selective_scan_interface"] = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    iface.selective_scan_fn, iface.mamba_inner_fn = ssi.selective_scan_ref, ssi.mamba_inner_fn
    mods["mamba_ssm.models.mixer_seq_simple"] = types.ModuleType("mamba_ssm.models.mixer_seq_simple")
    mods["mamba_ssm.models.mixer_seq_simple"].MambaLMHeadModel = None
    mods["mamba_ssm.modules.mamba_simple"] = types.ModuleType("mamba_ssm.modules.mamba_simple")
    mods["mamba_ssm.modules.mamba_simple"].Mamba = None
    sys.modules.update(mods)
    sys.path.insert(0, root)
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port or 29400 + os.getpid() % 500)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    logging.getLogger("mmcls").setLevel(logging.INFO)
    import mmfscil  # noqa: F401  (registers MambaNeck, ImageClassifierCIL, ETFHead, DRLoss)
    register_stand_ins()


def register_stand_ins() -> None:
    """The shared backbone and the dataset of our stream's tensors, in mmcls's registries."""
    from mmcv.parallel import DataContainer
    from mmcls.datasets.builder import DATASETS
    from mmcls.models.builder import BACKBONES

    @BACKBONES.register_module(force=True)
    class SharedBackbone(nn.Module):
        """Our network's last feature map, average-pooled to 2x2."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return F.adaptive_avg_pool2d(self.net.forward_feature_map(x), 2).float()

    @DATASETS.register_module(force=True)
    class SharedFSCILDataset(torch.utils.data.Dataset):
        """Our stream's images: base session (few_cls None), few-shot images of ``few_cls``, or the test images."""

        def __init__(self, store: "Store", subset: str = "train", few_cls=None, pipeline=None,
                     test_mode: bool = False, **_: Any) -> None:
            if subset == "test":
                self.x, self.y = store.test
            elif few_cls is None:
                self.x, self.y = store.base
            else:
                xs, ys = zip(*[store.few[c] for c in sorted({int(c) for c in few_cls}) if c in store.few])
                self.x, self.y = torch.cat(xs), torch.cat(ys)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> Dict[str, Any]:
            return dict(img=self.x[i], gt_label=self.y[i],
                        img_metas=DataContainer(dict(cls_id=int(self.y[i]), img_id=i), cpu_only=True))


class Store:
    """Our stream's tensors for the reference's dataset (an object, so that mmcv's configs and logs keep it whole)."""

    def __init__(self) -> None:
        self.base: Any = None
        self.test: Any = None
        self.few: Dict[int, Any] = {}

    def __repr__(self) -> str:
        return "<our stream's tensors>"


# --- weights shared between the sides ------------------------------------------------------------------------------
SSM_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
            "A_log", "D")


def name_map(has_residual: bool) -> Dict[str, str]:
    """Our projector / head state keys -> the reference model's (neck., head.)."""
    out = {"head.weight": "head.etf_vec"}
    for ours, ref in (("base", ("mlp_proj", "pos_embed", "block")), ("novel", ("mlp_proj_new", "pos_embed_new",
                                                                              "block_new"))):
        for i in (0, 1, 3):
            for p in ("weight", "bias"):
                if not (i == 3 and p == "bias"):
                    out[f"projector.{ours}.proj.{i}.{p}"] = f"neck.{ref[0]}.{i}.{p}"
        out[f"projector.{ours}.pos_embed"] = f"neck.{ref[1]}"
        for k in SSM_KEYS:
            out[f"projector.{ours}.ssm.{k}"] = f"neck.{ref[2]}.{k}"
    if has_residual:
        out["projector.residual_proj.weight"] = "neck.residual_proj.proj.weight"
    return out


def ours_state(st) -> Dict[str, torch.Tensor]:
    return {**{f"projector.{k}": v for k, v in st.projector.state_dict().items()},
            **{f"head.{k}": v for k, v in st.head.state_dict().items()}}


def copy_into_reference(st, ref: nn.Module, backbone: bool = True, only: str = "") -> None:
    """Load our projector / ETF (and backbone) weights into the reference model (``only``: a key prefix)."""
    names = name_map(not isinstance(st.projector.residual_proj, nn.Identity))
    src, dst = ours_state(st), ref.state_dict()
    with torch.no_grad():
        for o, r in names.items():
            if r in dst and o.startswith(only or "") and o in src:
                assert dst[r].shape == src[o].shape, (o, r, dst[r].shape, src[o].shape)
                dst[r].copy_(src[o])
        if backbone:
            ref.backbone.net.load_state_dict(st.model.state_dict())


# --- configs -------------------------------------------------------------------------------------------------------
def reference_cfgs(root: str, args, d: int, out_dim: int, store: Store, work_dir: str, seed: int):
    """The official CIFAR base / eval configs with our sizes, backbone and data (base: no image mixup)."""
    from mmcv import Config

    base = Config.fromfile(os.path.join(root, "configs/cifar/resnet12_etf_bs512_200e_cifar_mambafscil.py"))
    inc = Config.fromfile(os.path.join(root, "configs/cifar/resnet12_etf_bs512_200e_cifar_eval_mambafscil.py"))
    for cfg in (base, inc):
        cfg.model.backbone = dict(type="SharedBackbone", net=None)
        cfg.model.neck.update(in_channels=d, out_channels=out_dim, use_residual_proj=out_dim != d,
                              d_state=args.d_state)
        cfg.model.head.update(num_classes=K, eval_classes=BASE, in_channels=out_dim)
        data = dict(type="SharedFSCILDataset", store=store, pipeline=[])
        cfg.data = dict(samples_per_gpu=64, workers_per_gpu=0, train=dict(data, subset="train"),
                        val=dict(data, subset="test"), test=dict(data, subset="test"))
    base.model.train_cfg = None  # no image mixup / cutmix (ours has none)
    base.optimizer = dict(type="SGD", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    n_sessions = (K - BASE) // WAYS
    inc.update(dict(inc_start=BASE, inc_end=K, inc_step=WAYS, gpu_ids=[0], device="cpu", seed=seed,
                    work_dir=work_dir, step_list=(args.inc_steps,) * n_sessions, copy_list=(1,) * n_sessions,
                    base_copy_list=(1,) * n_sessions, grad_clip=args.grad_clip or None,
                    finetune_lr=float(getattr(args, "inc_lr", 0.25))))
    return base, inc


def build_model(cfg, net: nn.Module):
    from mmcls.models import build_classifier

    mc = copy.deepcopy(cfg.model)
    mc["backbone"] = dict(mc["backbone"], net=copy.deepcopy(net))
    return build_classifier(mc)


# --- our side ------------------------------------------------------------------------------------------------------
def make_ours(args, seed: int, stream: bool = True, **over):
    """Our stream (``stream``), backbone (``torch.manual_seed(seed)``) and strategy."""
    import ctta

    if stream:
        stream = ctta.streams.create("digits_fscil", base_classes=BASE, ways=WAYS, shots=SHOTS, seed=seed, epochs=1,
                                     base_epochs=args.base_epochs, batch_size=32)
    torch.manual_seed(seed)
    model = ctta.backbones.create("tiny_cnn", num_classes=K)
    hp = dict(lr=args.lr, d_state=args.d_state, backend="torch", seed=seed, inc_steps=args.inc_steps,
              inc_batch_size=8, loss_chunk=8, inc_grad_clip=args.grad_clip or None, tokens="map", grid=2,
              inc_lr=float(getattr(args, "inc_lr", 0.25)))
    hp.update(over)
    st = ctta.strategies.create("mamba_fscil", model, **hp)
    return stream, model, st


def stream_store(stream) -> Tuple[Store, List[Tuple[Any, torch.Tensor, torch.Tensor]]]:
    """Our stream's segments materialised, and the reference's dataset store (base epoch 1, few-shot, test)."""
    segs = []
    for seg in stream.segments:
        x, y, _ = seg.materialise(torch.device("cpu"))
        segs.append((seg, x, y))
    store = Store()
    for seg, x, y in segs:
        if seg.kind == "train":
            n = int(seg.num_samples) // max(int((seg.meta or {}).get("epochs", 1)), 1)
            if seg.meta["session"] == 0:
                store.base = (x[:n], y[:n])
            else:
                for c in seg.meta["classes"]:
                    store.few[int(c)] = (x[:n][y[:n] == c], y[:n][y[:n] == c])
    store.test = (segs[-1][1], segs[-1][2])
    return store, segs


def accuracies(pred: torch.Tensor, y: torch.Tensor) -> Tuple[float, float, float]:
    ok = (pred == y).float()
    novel = y >= BASE
    return (100 * ok.mean().item(), 100 * ok[~novel].mean().item(),
            100 * ok[novel].mean().item() if novel.any() else float("nan"))


def run_ours(st, segs) -> List[Tuple[float, float, float]]:
    """Our strategy over the stream (segment hooks, learn per batch, predict per eval batch): per-session accuracy."""
    out = []
    for seg, x, y in segs:
        st.segment_start(seg)
        if seg.kind == "train":
            for i in range(0, len(x), seg.batch_size):
                st.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
        else:
            with torch.no_grad():
                pred = torch.cat([st.predict(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
            out.append(accuracies(pred, y))
        st.segment_end(seg)
    return out


# --- randomness replay ---------------------------------------------------------------------------------------------
class Replay:
    """Our incremental generator's draws, handed to the reference's loader / mixup in our order of draws."""

    def __init__(self, seed: int) -> None:
        self.seed, self.session, self.gen = seed, 0, None

    def next_session(self) -> None:
        from ctta.seeding import stable_seed

        self.session += 1
        self.gen = torch.Generator().manual_seed(stable_seed(self.seed, "mamba_fscil_inc", self.session))

    def coin(self) -> float:
        """``np.random.random()`` for ``r > 1 - p``, from our ``u < p`` draw."""
        return 1.0 - float(torch.rand((), generator=self.gen))

    def randperm(self, n: int, *a, **k) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)


class ReplayLoader:
    """The session loader: a new permutation (ours: over our order of the items) per pass, incomplete batch dropped."""

    def __init__(self, dataset, batch_size: int, replay: Replay, our_order: torch.Tensor) -> None:
        self.ds, self.bs, self.replay, self.order = dataset, batch_size, replay, our_order

    def __iter__(self):
        n = len(self.ds)
        perm = self.replay.randperm(n)
        for b in perm[: (n // self.bs) * self.bs].split(self.bs):
            idx = self.order[b]
            yield {"feat": self.ds.feats[idx], "gt_label": self.ds.labels[idx]}


def our_order(labels: torch.Tensor, session_classes: List[int]) -> torch.Tensor:
    """Indices into the reference's session dataset in our order of items: the session's few-shot samples (k-th of a
    class <-> k-th), then one mean per earlier class by class id."""
    lab = labels.tolist()
    cur = [i for i, c in enumerate(lab) if c in session_classes]
    mem = sorted((i for i, c in enumerate(lab) if c not in session_classes), key=lambda i: lab[i])
    return torch.tensor(cur + mem)


def install_session_stand_ins(replay: Replay, session_ys: Dict[int, torch.Tensor]) -> None:
    """build_dataloader with 0 workers (the session loader: ReplayLoader), the mixup draws from ``replay``, and
    ``wrap_non_distributed_model`` -> a device-less MMDataParallel."""
    import mmfscil.apis.fscil as fs
    import mmfscil.models.classifier as clf
    from mmcv.parallel import MMDataParallel
    from mmcls.datasets import build_dataloader as official_build

    def build_dataloader(dataset, samples_per_gpu, workers_per_gpu, num_gpus=1, dist=True, shuffle=True, **kw):
        if shuffle:  # the incremental session's training loader
            replay.next_session()
            y_sess = session_ys[replay.session]
            classes = sorted(set(y_sess.tolist()))
            order = our_order(dataset.labels, classes)
            # the session's samples in our (stream) order: k-th of each class in the stream
            cur = order[: len(y_sess)]
            by_class = {c: [int(i) for i in cur if int(dataset.labels[i]) == c] for c in classes}
            order = torch.tensor([by_class[int(c)].pop(0) for c in y_sess] + order[len(y_sess):].tolist())
            return ReplayLoader(dataset, samples_per_gpu * num_gpus, replay, order)
        kw.update(persistent_workers=False, pin_memory=False)
        return official_build(dataset, samples_per_gpu, 0, num_gpus=num_gpus, dist=dist, shuffle=shuffle, **kw)

    fs.build_dataloader = build_dataloader
    fs.wrap_non_distributed_model = lambda model, device=None, **kw: MMDataParallel(model.cpu(), device_ids=None)
    proxy = types.ModuleType("torch_replay")
    proxy.__dict__.update(torch.__dict__)
    proxy.randperm = replay.randperm
    clf.torch = proxy
    clf.np = types.SimpleNamespace(random=types.SimpleNamespace(random=replay.coin))


class LogCapture(logging.Handler):
    """The reference's per-session evaluation lines (``[NN]Evaluation results : acc ...``)."""

    PAT = re.compile(r"\[(\d+)\]Evaluation results : acc : ([\d.na]+) ; acc_base : ([\d.na]+) ; acc_inc : ([\d.na]+)")

    def __init__(self) -> None:
        super().__init__()
        self.rows: List[Tuple[float, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PAT.search(record.getMessage())
        if m:
            self.rows.append(tuple(float(v) for v in m.groups()[1:]))


# --- the whole run -------------------------------------------------------------------------------------------------
def run_reference(args, seed: int, st0, store, segs, after_base=None):
    """Base session per batch (EpochBasedRunner's step), then the official ``fscil`` loop; per-session accuracy.
    ``after_base`` (our strategy as its base session ended): its backbone / base branch replace the reference's
    trained ones before ``fscil``, so that the incremental part starts from the same weights on both sides."""
    from mmcv.runner import build_optimizer
    from mmfscil.apis.fscil import fscil

    d, out_dim = st0.feat_dim, st0.head.weight.shape[0]
    work = tempfile.mkdtemp(prefix="mfs_ref_")
    base_cfg, inc_cfg = reference_cfgs(args.reference, args, d, out_dim, store, work, seed)
    model = build_model(base_cfg, st0.model)
    copy_into_reference(st0, model)
    opt = build_optimizer(model, base_cfg.optimizer)
    model.train()
    for seg, x, y in segs:
        if seg.kind == "train" and seg.meta["session"] == 0:
            for i in range(0, len(x), seg.batch_size):
                out = model.train_step(dict(img=x[i:i + seg.batch_size], gt_label=y[i:i + seg.batch_size]), opt)
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
    if after_base is not None:
        copy_into_reference(after_base, model)
    inc_model = build_model(inc_cfg, model.backbone.net)
    missing = inc_model.load_state_dict(model.state_dict(), strict=False)  # as load_checkpoint(strict=False)
    assert all("_new" in k for k in missing.missing_keys), missing
    copy_into_reference(st0, inc_model, backbone=False, only="projector.novel")
    replay = Replay(seed)
    session_ys = {s: y[: int(seg.num_samples)] for seg, x, y in segs
                  if seg.kind == "train" and (s := seg.meta["session"]) > 0}
    install_session_stand_ins(replay, session_ys)
    cap = LogCapture()
    logging.getLogger("mmcls").addHandler(cap)
    try:
        fscil(inc_model, inc_cfg, distributed=False)
    finally:
        logging.getLogger("mmcls").removeHandler(cap)
    return cap.rows


def _ddp_rank(rank: int, world: int, port: int, args, out: str) -> None:
    """One rank of the DDP check: the reference model on its chunk of 8, gradients averaged by DDP, one SGD step."""
    torch.set_num_threads(1)
    install_reference(args.reference, args.mamba, rank, world, port)
    from mmcv.runner import build_optimizer
    from mmfscil.apis.fscil import parse_losses

    f, y, st = _ddp_inputs(args, world)
    _, inc_cfg = reference_cfgs(args.reference, args, st.feat_dim, st.head.weight.shape[0], Store(),
                                tempfile.mkdtemp(prefix="mfs_d_"), 0)
    ref = build_model(inc_cfg, st.model)
    copy_into_reference(st, ref)
    ref.backbone, ref.mixup_prob = None, 0.0  # no feature mixup here (official: drawn per GPU; ours per batch)
    ref.head.eval_classes = K
    ref.train()
    ddp = torch.nn.parallel.DistributedDataParallel(ref, find_unused_parameters=True)
    opt = build_optimizer(ref, dict(type="SGD", lr=0.25, momentum=0.9, weight_decay=5e-4,
                                    paramwise_cfg=inc_cfg.optimizer.paramwise_cfg))
    sl = slice(8 * rank, 8 * rank + 8)
    loss, _ = parse_losses(ddp(return_loss=True, img=f[sl], gt_label=y[sl]))
    loss.backward()
    opt.step()
    if rank == 0:
        torch.save({k: v for k, v in ref.state_dict().items() if "_new" in k}, out)


def _ddp_inputs(args, world: int):
    _, _, st = make_ours(args, 0, stream=False, gate_flip="channels", mixup_prob=0.0, loss_chunk=8)
    ssm = st.projector.novel.ssm
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ssm.in_proj.weight[ssm.d_inner:] = torch.randn(ssm.in_proj.weight[ssm.d_inner:].shape, generator=g) * 0.1
    f = torch.randn(8 * world, st.feat_dim, 2, 2, generator=g)
    y = torch.randint(0, K, (8 * world,), generator=g)
    y[::4] = 0  # every chunk of 8 holds base and novel samples
    y[1::4] = 9
    return f, y, st


def ddp_check(args, world: int) -> None:
    """Our ``loss_chunk=8`` step on a batch of 8 x ``world`` against the reference on ``world`` gloo processes of 8
    (DDP's gradient mean, the all_reduce MIN gates, with_len over the gathered labels), feature mixup off."""
    import torch.multiprocessing as mp

    out = os.path.join(tempfile.mkdtemp(prefix="mfs_ddp_"), "rank0.pt")
    mp.spawn(_ddp_rank, args=(world, 29950 + os.getpid() % 40, args, out), nprocs=world, join=True)
    ref = torch.load(out)
    f, y, st = _ddp_inputs(args, world)
    for chunk in (8, 8 * world):
        s = copy.deepcopy(st)
        s.loss_chunk = chunk
        params = list(s.projector.novel.parameters())
        s.projector.novel.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=0.25, momentum=0.9, weight_decay=5e-4)
        with torch.enable_grad():
            s._novel_loss(f, y, y < BASE, torch.Generator().manual_seed(0)).backward()
        opt.step()
        names = name_map(False)
        worst = max(float((t - ref[names[o]]).abs().max()) for o, t in ours_state(s).items()
                    if o.startswith("projector.novel"))
        delta = max(float((t - ours_state(st)[o]).abs().max()) for o, t in ours_state(s).items()
                    if o.startswith("projector.novel"))
        print(f"DDP check, {world} processes x 8 vs ours loss_chunk={chunk} on {8 * world}: max |param diff| "
              f"{worst:.2e} (largest update {delta:.2e})", flush=True)


def snapshot_after_base(st) -> Dict[str, Any]:
    """Wrap ``st.end_session`` to keep a copy of the strategy as its base session ends (prototypes recomputed)."""
    box: Dict[str, Any] = {}
    end = st.end_session

    def end_session(session: int) -> None:
        end(session)
        if session == 0:
            box["st"] = copy.deepcopy(st)

    st.end_session = end_session
    return box


def noise_floor(args, seed: int, segs, rel: float = 1e-6) -> Tuple[float, float]:
    """Accuracy after our base session from the same initial weights and from weights perturbed by ``rel`` (relative,
    Gaussian): how far float-level differences carry through the base session's training from scratch."""
    accs = []
    for eps in (0.0, rel):
        _, _, st = make_ours(args, seed, stream=False)
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in list(st.model.parameters()) + list(st.projector.base.parameters()):
                p.mul_(1 + eps * torch.randn(p.shape, generator=g))
        out = run_ours(st, segs[:2])
        accs.append(out[0][0])
    return accs[0], accs[1]


def incremental_noise_floor(after_base, segs, rel: float = 1e-6) -> List[Tuple[float, float, float]]:
    """Our incremental sessions from the base session's end (``after_base``), the base-class means and few-shot
    features as computed, but the novel branch's initial weights perturbed by ``rel`` (relative, Gaussian)."""
    st = copy.deepcopy(after_base)
    st.__dict__.pop("end_session", None)  # the snapshot's copy of the wrapper would train the original
    g = torch.Generator().manual_seed(98)
    with torch.no_grad():
        for p in st.projector.novel.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g))
    out = run_ours(st, segs[2:])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--mamba", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--base-epochs", type=int, default=2)
    ap.add_argument("--inc-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--d-state", type=int, default=256)
    ap.add_argument("--inc-lr", type=float, default=0.25, help="incremental lr, both sides (official finetune_lr)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="both sides (0: none, the official)")
    ap.add_argument("--skip-components", action="store_true")
    ap.add_argument("--components-only", action="store_true")
    ap.add_argument("--noise-floor", action="store_true", help="also our base session from perturbed weights")
    ap.add_argument("--ddp", type=int, default=0, help="also the DDP check with this many gloo processes (0: none)")
    ap.add_argument("--gate-flip", nargs="+", default=["channels", "tokens"],
                    help="our gate_flip values to run (channels: as the official code; tokens: our default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.ddp:  # before this process joins a group of its own
        ddp_check(args, args.ddp)
    install_reference(args.reference, args.mamba)
    import mmcv
    mmcv.utils.get_logger("mmcls").setLevel(logging.INFO)
    if not args.skip_components:
        for flip in args.gate_flip:
            component_checks(args, flip)
    if args.components_only:
        return 0
    table = []
    for seed in args.seeds:
        refs: Dict[str, Any] = {}
        for flip in args.gate_flip:
            t0 = time.time()
            stream, model, st = make_ours(args, seed, gate_flip=flip)
            st0 = copy.deepcopy(st)
            store, segs = stream_store(stream)
            box = snapshot_after_base(st)
            ours = run_ours(st, segs)
            t1 = time.time()
            if "ref" not in refs:  # the reference's own base session does not depend on our gate_flip
                refs["ref"] = run_reference(args, seed, st0, store, segs)
            ref = refs["ref"]
            shared = run_reference(args, seed, st0, store, segs, after_base=box["st"])
            print(f"seed {seed}, ours gate_flip={flip}: ours {[tuple(round(v, 2) for v in r) for r in ours]} "
                  f"({t1 - t0:.0f} s), reference {ref}, reference from our base weights {shared} "
                  f"({time.time() - t1:.0f} s)", flush=True)
            table.append((seed, flip, ours, ref, shared))
        if args.noise_floor:
            same, perturbed = noise_floor(args, seed, segs)
            print(f"seed {seed}: noise floor, our base session: {same:.2f} from the same weights, {perturbed:.2f} "
                  f"from weights x (1 + 1e-6 N(0, 1))", flush=True)
            inc = incremental_noise_floor(box["st"], segs)
            print(f"seed {seed}: noise floor, our incremental sessions from the same base weights, the novel "
                  f"branch's initial weights x (1 + 1e-6 N(0, 1)) (gate_flip={args.gate_flip[-1]}): "
                  f"{[tuple(round(v, 2) for v in r) for r in inc]}", flush=True)
    print("\n| seed | our gate_flip | session | ours all / base / novel | reference all / base / novel | "
          "reference from our base weights | diff all (own / shared base) |")
    print("|---|---|---|---|---|---|---|")

    def fmt(r):
        return " / ".join(f"{v:.2f}" for v in r)

    for seed, flip, ours, ref, shared in table:
        for s, (o, r, h) in enumerate(zip(ours, ref, shared)):
            print(f"| {seed} | {flip} | {s} | {fmt(o)} | {fmt(r)} | {fmt(h)} | {o[0] - r[0]:+.2f} / "
                  f"{o[0] - h[0]:+.2f} |")
    return 0


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.detach().double(), b.detach().double()
    return f"max |diff| {float((a - b).abs().max()):.2e} (max |value| {float(b.abs().max()):.2e})"


def component_checks(args, gate_flip: str) -> Dict[str, float]:
    """Neck, class-sensitive losses and one incremental step on the same weights and inputs (printed)."""
    from mmcv.runner import build_optimizer
    from ctta.strategies.mamba_fscil import separation_loss, suppression_term

    _, _, st = make_ours(args, 0, gate_flip=gate_flip)
    d, out_dim, ssm = st.feat_dim, st.head.weight.shape[0], st.projector.novel.ssm
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # a non-zero novel gate, so that z, the novel output and the losses are not trivially 0
        ssm.in_proj.weight[ssm.d_inner:] = torch.randn(ssm.in_proj.weight[ssm.d_inner:].shape, generator=g) * 0.1
    _, inc_cfg = reference_cfgs(args.reference, args, d, out_dim, Store(), tempfile.mkdtemp(prefix="mfs_c_"), 0)
    ref = build_model(inc_cfg, st.model)
    copy_into_reference(st, ref)
    ref.backbone = None
    f = torch.randn(16, d, 2, 2, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 2)
    is_base = y < BASE
    worst: Dict[str, float] = {}

    def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        worst[name] = float((a.detach().double() - b.detach().double()).abs().max())
        print(f"  {name}: {_diff(a, b)}", flush=True)

    print(f"component checks (gate_flip={gate_flip}, d={d}, out={out_dim}, d_state={args.d_state}):")
    ours = st.projector(f, use_novel=True)
    theirs = ref.neck(f)
    report("neck out", ours["out"], theirs["out"])
    report("neck residual + base branch", ours["base"] + f.mean(dim=(2, 3)), theirs["residual"])
    report("novel branch gate z (x_main)", ours["z_novel"], theirs["main"])
    b, L = f.shape[0], 4
    for k, r in (("dt", "dts_new"), ("B", "Bs_new"), ("C", "Cs_new")):
        report(f"scan parameter {k}", ours["params_novel"][k], theirs[r].reshape(b, -1, L))
    losses: Dict[str, torch.Tensor] = {}
    z, dts, Bs, Cs = theirs["main"], theirs["dts_new"], theirs["Bs_new"], theirs["Cs_new"]
    ref.calculate_class_sensitive_losses(losses, is_base, ~is_base, z, None, None, None, dts, Bs, Cs)
    report("loss_supp_base", st.supp_weight * suppression_term(z, is_base, 16), losses["loss_supp_base"])
    report("loss_supp_novel", -st.supp_novel_weight * suppression_term(z, ~is_base, 16), losses["loss_supp_novel"])
    for key, t in (("dts_new", dts), ("Bs_new", Bs), ("Cs_new", Cs)):
        report(f"loss_sep_{key}", st.sep_weight * separation_loss(t.reshape(b, -1, L), is_base, 16),
               losses[f"loss_sep_{key}"])
    # one incremental step, batch 8 (the official per-GPU batch), lr 0.25, the mixup draws replayed
    replay = Replay(0)
    install_session_stand_ins(replay, {})
    replay.next_session()
    ours_gen = torch.Generator().manual_seed(replay.gen.initial_seed())
    fb, yb = f[:8], torch.tensor([0, 1, 2, 6, 6, 7, 7, 3])
    params = list(st.projector.novel.parameters())
    st.projector.novel.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.25, momentum=0.9, weight_decay=5e-4)
    with torch.enable_grad():
        loss = st._novel_loss(fb, yb, yb < BASE, ours_gen)
        loss.backward()
    opt.step()
    ref.head.eval_classes = 8
    ref.train()
    ropt = build_optimizer(ref, dict(type="SGD", lr=0.25, momentum=0.9, weight_decay=5e-4,
                                     paramwise_cfg=inc_cfg.optimizer.paramwise_cfg))
    from mmfscil.apis.fscil import parse_losses

    rl, _ = parse_losses(ref(return_loss=True, img=fb, gt_label=yb))
    rl.backward()
    ropt.step()
    report("one step: loss", loss, rl)
    names = name_map(False)
    rs = ref.state_dict()
    for o, t in ours_state(st).items():
        if o.startswith("projector.novel"):
            report(f"one step: {o[len('projector.novel.'):]}", t, rs[names[o]])
    return worst


if __name__ == "__main__":
    sys.exit(main())
