"""Avalanche interop: export a class-incremental ctta stream as an Avalanche benchmark, and build a ctta stream
from an Avalanche benchmark. Avalanche is imported only inside these functions (its import takes seconds)."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import Tensor

from ctta.errors import ConfigError, UnsupportedError

from .base import Segment, Stream
from .datasets import ImageSet
from .incremental import Part, check_int, parts_segment

CI_SETTINGS = ("class_incremental", "few_shot_class_incremental", "online_class_incremental")


class _TensorDataset(torch.utils.data.TensorDataset):
    """A TensorDataset with the ``targets`` list Avalanche reads to split by class."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def to_avalanche(stream: Stream, device: str = "cpu") -> Any:
    """The sessions of a class-incremental stream as an Avalanche ``CLScenario`` (train_stream / test_stream).

    Built with ``avalanche.benchmarks.scenarios.class_incremental_benchmark`` from the stream's class order and
    session sizes: the train data are the stream's ``train`` segments (one epoch), the test data its last eval.
    """
    if stream.setting not in CI_SETTINGS:
        raise UnsupportedError(f"only class-incremental streams export to Avalanche; {stream.name!r} is "
                               f"{stream.setting!r}")
    sessions = [s for s in stream.segments if s.kind == "train" and s.role == "session"]
    evals = [s for s in stream.segments if s.kind == "eval"]
    if not sessions or not evals or any("classes" not in s.meta for s in sessions):
        raise UnsupportedError(f"stream {stream.name!r} has no class-incremental sessions with their classes")
    from avalanche.benchmarks.scenarios import class_incremental_benchmark

    dev = torch.device(device)
    xs, ys = [], []
    for s in sessions:
        x, y, _ = s.materialise(dev)
        n = s.num_samples // int(s.meta.get("epochs", 1))
        xs.append(x[:n].cpu())  # the first epoch: each sample once
        ys.append(y[:n].cpu())
    x_test, y_test, _ = evals[-1].materialise(dev)
    order = [c for s in sessions for c in s.meta["classes"]]
    if sorted(order) != list(range(len(order))):
        raise UnsupportedError(f"Avalanche needs the classes 0..{len(order) - 1} all in the stream; the sessions "
                               f"of {stream.name!r} cover {sorted(order)[:10]}...")
    data = {"train": _TensorDataset(torch.cat(xs), torch.cat(ys)),
            "test": _TensorDataset(x_test.cpu(), y_test.cpu())}
    return class_incremental_benchmark(data, class_order=order,
                                       num_classes_per_exp=[len(s.meta["classes"]) for s in sessions])


def _read(dataset: Any, what: str) -> ImageSet:
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=512, shuffle=False, num_workers=0):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[0], Tensor):
            raise ConfigError(f"{what}: items must be (image tensor, label, ...); give the benchmark a ToTensor "
                              f"transform")
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]).long())
    if not xs:
        raise ConfigError(f"{what}: an empty experience")
    y = torch.cat(ys)
    return ImageSet(images=torch.cat(xs), labels=y, classes=[str(i) for i in range(int(y.max()) + 1)])


def from_avalanche(benchmark: Any, batch_size: int = 32, eval_batch_size: int = 256, epochs: int = 1,
                   setting: str = "class_incremental", name: str = "avalanche", seed: int = 0,
                   num_classes: Optional[int] = None) -> Stream:
    """A ctta stream from an Avalanche benchmark: each train experience is a ``train`` session, followed by an
    eval on the test experiences 0..i (one group per experience), the accuracy-matrix layout of Avalanche."""
    from ctta.seeding import stable_seed

    check_int("epochs", epochs)
    train_stream = getattr(benchmark, "train_stream", None)
    test_stream = getattr(benchmark, "test_stream", None)
    if train_stream is None or test_stream is None:
        raise ConfigError(f"expected an Avalanche benchmark with train_stream and test_stream, got "
                          f"{type(benchmark).__name__}")
    train_sets = [_read(e.dataset, f"train experience {i}") for i, e in enumerate(train_stream)]
    test_sets = [_read(e.dataset, f"test experience {i}") for i, e in enumerate(test_stream)]
    if len(train_sets) != len(test_sets):
        raise ConfigError(f"{len(train_sets)} train but {len(test_sets)} test experiences")
    segments: List[Segment] = []
    names: List[str] = []
    for k, (tr, te) in enumerate(zip(train_sets, test_sets)):
        sname = f"session-{k}"
        names.append(sname)
        classes = sorted(set(tr.labels.tolist()))
        segments.append(parts_segment(sname, "train", [Part(tr, torch.arange(len(tr)))], batch_size, role="session",
                                      meta={"session": k, "classes": classes, "epochs": epochs},
                                      shuffle_seed=stable_seed(seed, "shuffle", sname), epochs=epochs))
        parts = [Part(t, torch.arange(len(t)), group=j) for j, t in enumerate(test_sets[:k + 1])]
        seen = sorted({c for t in train_sets[:k + 1] for c in set(t.labels.tolist())})
        segments.append(parts_segment(f"eval@{sname}", "eval", parts, eval_batch_size, role="probe",
                                      meta={"after": sname, "classes": seen}, groups=list(names)))
    n_cls = num_classes or 1 + max(int(s.labels.max()) for s in train_sets + test_sets)
    spec = {"name": name, "source": "avalanche", "batch_size": batch_size, "eval_batch_size": eval_batch_size,
            "epochs": epochs, "seed": seed, "custom": True}
    return Stream(name=name, segments=segments, num_classes=n_cls, setting=setting, spec=spec)


__all__ = ["from_avalanche", "to_avalanche"]
