"""Shared fixtures: tiny random models and tiny data made by the tests themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, pooling, linear: small enough for CPU tests, with every layer kind the strategies touch."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (the backbone feature API of ``ctta.backbones.Classifier``)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return x.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def make_tiny(seed: int = 0, num_classes: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    m = TinyNet(num_classes)
    # non-trivial source statistics, as a trained model would have
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def tiny_model() -> TinyNet:
    return make_tiny()


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 8, 8, generator=g)


@pytest.fixture
def npz_dataset(tmp_path: Path) -> Path:
    """A CIFAR-like .npz test set: 60 images of 32x32 (uint8 NHWC), 10 classes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "test.npz"
    np.savez(path, images=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(60) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    return path


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the demo model cache inside the test session, never in the user's home."""
    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids the oversubscription stalls of a busy shared CPU (``usefixtures`` per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(num_classes: int = 4):
    """A 2-block, 16-wide timm ViT on 16 px images, seeded: the pretrained-model CL tests' backbone."""
    from ctta.backbones import create

    torch.manual_seed(0)
    return create("vit_tiny_patch16_224", num_classes=num_classes, img_size=16, patch_size=4, depth=2, embed_dim=16,
                  num_heads=2)


def stripe_data(classes, n_per: int = 8, seed: int = 0, size: int = 32):
    """Separable tiny images for continual-learning tests: class c brightens channel c % 3 in a class band."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(n_per)
    x = torch.rand(len(y), 3, size, size, generator=g) * 0.3
    half = size // 2
    for i, c in enumerate(y.tolist()):
        x[i, c % 3, half * (c // 2):half * (c // 2) + half] += 0.7
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def two_session_stream(data, n_eval: int = 4, batch: int = 8):
    """Classes {0, 1} then {2, 3} as train sessions, each followed by an eval segment on every class seen so far."""
    from ctta.streams.base import Stream, tensor_segment

    segs, seen = [], []
    for k, cls in enumerate([[0, 1], [2, 3]]):
        x, y = data(cls, seed=k)
        segs.append(tensor_segment(f"session-{k}", "train", x, y, batch, role="session", meta={"classes": cls}))
        seen += cls
        xt, yt = data(seen, n_per=n_eval, seed=10 + k)
        segs.append(tensor_segment(f"eval@session-{k}", "eval", xt, yt, 32, role="probe",
                                   meta={"after": f"session-{k}"}))
    return Stream("tiny_ci", segs, num_classes=4, setting="class_incremental", spec={"name": "tiny_ci"})


def quadrant_data(classes, n_per: int = 12, seed: int = 0):
    """Separable 8x8 images: class c brightens channel c % 3 in a class-specific quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(n_per)
    x = torch.rand(len(y), 3, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, c % 3, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 0.7
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.fixture
def ic(monkeypatch):
    """The installed ``imagecorruptions.corruptions``: its import needs ``pkg_resources`` (stubbed here when absent),
    and its frost texture paths are pointed at the package data; skipped where the package does not import."""
    import os
    import sys
    import types

    if "pkg_resources" not in sys.modules:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda *args: ""
        monkeypatch.setitem(sys.modules, "pkg_resources", stub)
    try:
        from imagecorruptions import corruptions
    except Exception as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"imagecorruptions does not import: {err}")
    pkg = os.path.dirname(corruptions.__file__)
    monkeypatch.setattr(corruptions, "resource_filename", lambda _mod, rel: os.path.join(pkg, rel))
    return corruptions


def interrupt_at(strategy, at_call: int = 5):
    """Make ``strategy.adapt`` raise KeyboardInterrupt at its ``at_call``-th call (a run cut mid-stream, to resume)."""
    original, calls = strategy.adapt, {"n": 0}

    def cut(x):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(x)

    strategy.adapt = cut
    return strategy


class WithLayer4(nn.Module):
    """Conv-BN, a ``layer4`` block (the top layers SAR / DeYO keep frozen), linear: for freeze tests."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.layer4(torch.relu(self.bn1(self.conv1(x))))).mean(dim=(2, 3)))


def adapt_once(name: str, images: torch.Tensor, **hp):
    """``name`` on a fresh tiny model, one adapt step on ``images``: (strategy, its output, the model's output just
    before, the state-dict keys the step changed) for the "adapts only X, returns the pre-update prediction" tests."""
    from ctta import strategies

    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = strategies.create(name, model, **hp)
    with torch.no_grad():
        expected = s.model(images)
    out = s.adapt(images)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    return s, out, expected, changed
