"""RDumb (``rdumb``): ETA with a full reset every ``reset_every`` steps."""
from __future__ import annotations

import torch

from conftest import make_tiny
from ctta import strategies


def _state(s):
    return {k: v.detach().clone() for k, v in s.state_dict().items()}


def test_rdumb_resets_everything_after_every_reset_every_steps(images):
    s = strategies.create("rdumb", make_tiny(), reset_every=3, lr=1e-2, e_margin=10.0, d_margin=1.0)
    start = _state(s)
    outs = [s.adapt(images * (1 - 0.1 * k)) for k in range(3)]
    assert not torch.equal(outs[0], outs[2]) or not torch.equal(outs[1], outs[2])
    after = _state(s)  # the third step was followed by the reset
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert len(s.optimizer.state) == 0 and not bool(s.probs_set)
    # the fourth step is a fresh strategy's first
    assert torch.equal(s.adapt(images), strategies.create("rdumb", make_tiny(), reset_every=3, lr=1e-2,
                                                          e_margin=10.0, d_margin=1.0).adapt(images))


def test_rdumb_counts_steps_without_an_update():
    s = strategies.create("rdumb", make_tiny(), reset_every=2, e_margin=1e-6)  # nothing reliable: no update
    x = torch.rand(8, 3, 8, 8)
    s.adapt(x)
    assert int(s.updates) == 1
    s.adapt(x)
    assert int(s.updates) == 0  # reset after the second step


def test_rdumb_defaults_are_the_reference_values():
    s = strategies.create("rdumb", make_tiny(num_classes=10))
    assert s.reset_every == 1000 and s.fisher is None and s.d_margin == 0.4
    assert isinstance(s.optimizer, torch.optim.Adam) and s.optimizer.defaults["lr"] == 1e-3
    before = _state(s)
    x = torch.rand(16, 3, 8, 8)
    for _ in range(5):
        s.adapt(x)
    assert int(s.updates) == 5 and any(not torch.equal(before[k], v) for k, v in _state(s).items())
