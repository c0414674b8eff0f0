"""Covariate-shift orders of a TTA stream and their schedules: which domains, at which severities, how often.

Orders (the ``order`` spec key):

- ``continual``: the domains in the given (standard) order, one segment each, no reset (CoTTA / TENT online).
- ``random``: the same, in a seeded random domain order.
- ``reset``: ``continual`` with the model reset before each domain (Döbler et al.'s ``reset_each_shift``).
- ``gradual``: one segment per domain whose sub-blocks go 1 -> severity -> 1 (1,2,3,4,5,4,3,2,1 at severity 5),
  as the ``gradual`` setting of Döbler et al.'s benchmark.
- ``gradual_cotta``: CoTTA's gradual setting (qinenergy/cotta ``cifar10c_gradual.py``): the first domain starts at
  the top, severity -> 1 (5,4,3,2,1), "to simulate the large gap between the source and first target domain";
  every later domain goes 1 -> severity -> 1.
- ``mixed``: every domain's samples shuffled into one segment; ``groups`` are the domain names.
- ``long_term``: ``continual`` repeated ``rounds`` times (default 10) verbatim: same samples, same order, same
  corruption noise, so any change between rounds is the model's error accumulation.
- ``recurring``: the sequence revisited ``rounds`` times (default 10) with the same domain order but a fresh sample
  draw, order and corruption noise every round (recurring TTA, as in PeTTA / RDumb's repeated CCC sequences).

``rounds`` > 1 with any other order repeats that order verbatim. Each gradual sub-block holds ``num_samples``
images (CoTTA and Döbler use the whole test set at every severity step); within a round a domain's sub-blocks take
disjoint images while the test set lasts.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from ctta.errors import ConfigError

ORDERS = ("continual", "random", "reset", "gradual", "gradual_cotta", "mixed", "long_term", "recurring")
REPEATED = ("long_term", "recurring")  # orders whose default is 10 rounds
DEFAULT_ROUNDS = 10


def check_rounds(order: str, rounds: Any) -> int:
    """The number of rounds: ``rounds`` when given (an integer >= 1), else 10 for long_term/recurring, 1 otherwise."""
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if rounds is None:
        return DEFAULT_ROUNDS if order in REPEATED else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    return rounds


def check_clean_ratio(clean_ratio: Any, batch_size: int) -> int:
    """Validate the in-distribution share of every batch; return the clean samples per full batch."""
    if isinstance(clean_ratio, bool) or not isinstance(clean_ratio, (int, float)) or not 0 <= clean_ratio < 1:
        raise ConfigError(f"clean_ratio must be a number in [0, 1), got {clean_ratio!r}")
    per_batch = int(round(clean_ratio * batch_size))
    if clean_ratio > 0 and not 1 <= per_batch < batch_size:
        raise ConfigError(f"clean_ratio {clean_ratio} with batch size {batch_size} gives {per_batch} clean samples "
                          f"per batch; choose a ratio that leaves at least one clean and one shifted sample")
    return per_batch


def severity_schedule(order: str, domain_index: int, severity: int) -> Tuple[int, ...]:
    """Severities of a domain's sub-blocks: (severity,) except for the gradual orders (see module docstring)."""
    if order not in ("gradual", "gradual_cotta"):
        return (severity,)
    if order == "gradual_cotta" and domain_index == 0:
        return tuple(range(severity, 0, -1))
    return tuple(range(1, severity + 1)) + tuple(range(severity - 1, 0, -1))


def clean_mix_slots(num_shifted: int, batch_size: int, clean_per_batch: int, seed: int) -> torch.Tensor:
    """A bool per position of a segment: True where a clean sample goes, ``clean_per_batch`` in every full batch.

    Each batch holds ``batch_size - clean_per_batch`` shifted samples (the last one fewer, with its clean share
    rounded), at seeded random positions within the batch.
    """
    shifted = batch_size - clean_per_batch
    g = torch.Generator().manual_seed(seed)
    slots = []
    done = 0
    while done < num_shifted:
        s = min(shifted, num_shifted - done)
        c = clean_per_batch if s == shifted else int(round(s * clean_per_batch / shifted))
        mark = torch.cat([torch.zeros(s, dtype=torch.bool), torch.ones(c, dtype=torch.bool)])
        slots.append(mark[torch.randperm(s + c, generator=g)])
        done += s
    return torch.cat(slots) if slots else torch.zeros(0, dtype=torch.bool)


__all__ = ["DEFAULT_ROUNDS", "ORDERS", "check_clean_ratio", "check_rounds", "clean_mix_slots", "severity_schedule"]
