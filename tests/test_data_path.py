"""The bounded data path: segments arrive in chunks of whole batches, fetched ahead, with results independent of it."""
from __future__ import annotations

import threading

import pytest
import torch

import ctta
from ctta import strategies
from ctta.errors import ConfigError
from ctta.streams.base import CHUNK_BYTES, Segment, Stream
from ctta.streams.gather import Block, gathered_segment

from conftest import make_tiny

CPU = torch.device("cpu")


def _cat(chunks):
    chunks = list(chunks)
    x, y = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    g = None if chunks[0][2] is None else torch.cat([c[2] for c in chunks])
    return x, y, g, [c[0].shape[0] for c in chunks]


@pytest.mark.parametrize("order,extra", [("continual", {}), ("mixed", {"clean_ratio": 0.25}),
                                         ("gradual", {}), ("continual", {"label_shift": {"kind": "dirichlet",
                                                                                          "delta": 0.1}})])
def test_chunks_hold_the_same_samples_as_the_whole_segment(order, extra):
    stream = ctta.streams.create("digits_c", corruptions="gaussian_noise,contrast", order=order, batch_size=16,
                                 num_samples=150, **extra)
    for seg in stream:
        x, y, g = seg.materialise(CPU)
        for size, prefetch in ((16, True), (40, False), (10_000, True)):
            cx, cy, cg, lengths = _cat(seg.chunks(CPU, chunk_size=size, prefetch=prefetch))
            assert torch.equal(cx, x) and torch.equal(cy, y)
            assert (g is None and cg is None) or torch.equal(cg, g)
            step = seg.chunk_length(size)
            assert step % seg.batch_size == 0 or step == seg.num_samples  # batches never straddle chunks
            assert all(n == step for n in lengths[:-1])


def test_chunk_length_rounds_to_whole_batches_and_auto_keeps_small_segments_whole():
    seg = ctta.streams.tensor_segment("d", "adapt", torch.zeros(100, 3, 8, 8, dtype=torch.uint8),
                                      torch.zeros(100), 16)
    assert seg.chunk_length(None) == 100  # 100 small images: one chunk, today's whole-on-device path
    assert seg.chunk_length(40) == 32 and seg.chunk_length(5) == 16 and seg.chunk_length(10 ** 6) == 100
    big = Segment("big", "adapt", 50_000, 64, fetch=lambda a, b, pin: None, finish=lambda h, d: h,
                  image_shape=(3, 224, 224))
    n = big.chunk_length(None)
    assert n % 64 == 0 and n * 3 * 224 * 224 * 4 <= CHUNK_BYTES < (n + 64) * 3 * 224 * 224 * 4


def test_at_most_two_chunks_are_held_and_each_is_fetched_once():
    """The memory bound: chunk k+1 is fetched while chunk k is used, never more, whatever the segment length."""
    n, bs = 640, 32
    live, peak, fetched, lock = [0], [0], [], threading.Lock()
    data = torch.arange(n, dtype=torch.float32)

    class Tracked:
        def __init__(self, a, b):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            self.a, self.b = a, b

        def __del__(self):
            with lock:
                live[0] -= 1

    def fetch(a, b, pin):
        fetched.append((a, b))
        return Tracked(a, b)

    def finish(host, device):
        x = data[host.a:host.b].view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
        return x, torch.zeros(host.b - host.a, dtype=torch.long)

    seg = Segment("long", "adapt", n, bs, fetch=fetch, finish=finish, image_shape=(3, 2, 2))
    seen = []
    for x, _, _ in seg.chunks(CPU, chunk_size=64):
        seen.append(x[:, 0, 0, 0])
    assert torch.equal(torch.cat(seen), data)
    assert fetched == [(a, a + 64) for a in range(0, n, 64)]
    assert peak[0] <= 2


def _tent_run(stream, chunk_size):
    s = strategies.create("tent", make_tiny(num_classes=10))
    res = ctta.run(stream, s, device="cpu", progress=False, chunk_size=chunk_size)
    return res.steps["correct"].tolist(), [p.detach().clone() for p in s.model.parameters()]


def test_a_run_gives_the_same_results_whatever_the_chunk_size():
    stream = ctta.streams.create("digits_c", corruptions="gaussian_noise,shot_noise", batch_size=16, num_samples=96,
                                 order="mixed", clean_ratio=0.25)
    ref_steps, ref_params = _tent_run(stream, None)
    for size in (16, 48):
        steps, params = _tent_run(stream, size)
        assert steps == ref_steps
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_gathered_segment_repeats_and_orders_blocks_and_runs_transforms_once_per_distinct_image():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    calls = []

    def plus_one(x):
        calls.append(x.shape[0])
        return x + 1.0 / 255

    blocks = [Block(images, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), group=0),
              Block(images, torch.tensor([5, 6]), torch.tensor([1, 1]), group=1, transform=plus_one)]
    order = torch.tensor([4, 0, 3, 4, 1, 2, 3, 0])  # repeats (epochs) and interleaving
    seg = gathered_segment("s", "train", blocks, 4, order=order, groups=["a", "b"])
    x, y, g = seg.materialise(CPU)
    values = (x[:, 0, 0, 0] * 255).round().long().tolist()
    assert values == [7, 0, 6, 7, 1, 2, 6, 0]
    assert y.tolist() == [1, 0, 1, 1, 0, 0, 1, 0] and g.tolist() == y.tolist()
    assert calls == [2]  # the two distinct images of block 1, once, though each appears twice
    with pytest.raises(ConfigError, match="outside"):
        gathered_segment("s", "train", blocks, 4, order=torch.tensor([5]))


def test_bad_chunk_size_is_a_one_line_error():
    stream = Stream("s", [ctta.streams.tensor_segment("d", "adapt", torch.rand(4, 3, 4, 4), torch.zeros(4), 2)], 4)
    with pytest.raises(ConfigError, match="chunk_size"):
        ctta.run(stream, strategies.create("source", make_tiny()), device="cpu", progress=False, chunk_size=0)
