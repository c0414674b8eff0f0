"""UniTTA scenarios: one Markov chain over (domain, class) states that composes domain and class shift.

UniTTA (Du et al., 2024, arXiv 2407.20080; LeapLabTHU/UniTTA) builds every test stream from two per-axis chains,
one over the domains and one over the classes, each given by a correlation factor ``cor`` and an imbalance
factor ``imb``:

- the axis' head-to-tail sample ratios are geometric, ``r_k ∝ imb^(-k/(K-1))`` (the long-tail prior of
  :func:`~ctta.streams.label_shift.longtail_counts`: the head holds ``imb`` times the tail);
- its transition matrix stays in state k with probability ``c_k`` and moves to each other state with
  ``(1 - c_k) / (K - 1)``. When the factors are *consistent*, ``(1 - cor) * imb <= 1 - 1/K`` and ``cor < 1``,
  the ``c_k`` are graded, ``1 - c_k ∝ imb^(k/(K-1))`` with ``c_0 = cor``, so that the chain's stationary
  distribution is exactly the ratios; otherwise every ``c_k = cor`` and the imbalance is imposed by caps
  (below). ``cor = 1/K`` makes the rows uniform (i.i.d. samples), a larger ``cor`` correlates consecutive
  samples (non-i.i.d.), ``cor = 1`` never leaves a state (continual: one after another);
- the state chain is the Kronecker product ``D ⊗ C``: domain and class move independently at every step.

Sampling starts in the head state (domain 0, class 0); each visit of (d, c) takes the next image of that pool,
a seeded permutation of the class' clean images seen through domain d, cycled when a pool runs out (as the
official sampler's deque). The stopping rule is the official one: with both axes consistent, stop when a state
has been visited ``max_state_samples`` times; otherwise caps ``round(max_state_samples * r_d r_c / (r_0 r_0))``
apply per state (both axes inconsistent), per domain (the domain axis only) or per class (the class axis only),
an exhausted state / domain / class is never entered again, and the stream ends when nothing is left. From an
exhausted state whose row has no valid successor the chain moves on to the next domain (class) in order when
that axis is continual, else to a uniformly drawn valid state; with both axes continual, to the next class of
the same domain, then to the next domain's first class (UniTTA's own code walks the diagonal there).

This module is our own implementation: the chain is drawn run by run (a geometric stay, then one jump over the
valid states), the pools and the per-axis statistics are computed with array operations. The ``unitta`` stream
turns a draw into ONE adapt segment over per-domain blocks of the clean test set (each corrupted on the device,
or read from the released -C files when present), with the domains as groups. The 36 named presets are
:data:`PRESETS`; docs/streams.md maps them to UniTTA's codes.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError
from ctta.seeding import stable_seed

from .base import STREAMS, Stream
from .gather import Block, gathered_segment

log = logging.getLogger(__name__)

AXES = ("domain", "class")
_EPS = 1e-12

# ---------------------------------------------------------------- presets

CORRELATIONS = ("iid", "niid", "cont")
BALANCES = ("bal", "imb")
# UniTTA's sh/run.sh values: i.i.d. = 1/K (0.067 for 15 domains, 1/K to 3 decimals for classes), non-i.i.d.
# 0.85 (domains) / 0.95 (classes), continual 1.0; imbalanced 5 (domains) / 10 (classes)
NIID_COR = {"domain": 0.85, "class": 0.95}
IMBALANCE = {"domain": 5.0, "class": 10.0}
_COR_CHAR = {"iid": "i", "niid": "n", "cont": "1"}
_IMB_CHAR = {"bal": "1", "imb": "u"}


def preset_name(domain_cor: str, domain_imb: str, class_cor: str, class_imb: str) -> str:
    return f"dom_{domain_cor}_{domain_imb}-cls_{class_cor}_{class_imb}"


PRESETS: Tuple[str, ...] = tuple(preset_name(dc, db, cc, cb) for dc, db, cc, cb in
                                 itertools.product(CORRELATIONS, BALANCES, CORRELATIONS, BALANCES))


def _parts(name: str) -> Tuple[str, str, str, str]:
    dom, cls = name.split("-")
    _, dc, db = dom.split("_")
    _, cc, cb = cls.split("_")
    return dc, db, cc, cb


def unitta_code(name: str) -> str:
    """UniTTA's test-setting code of a preset (sh/run.sh: ``{cor class}{imb class}{cor domain}{imb domain}``,
    cor ``i`` / ``n`` / ``1``, imb ``1`` / ``u``), e.g. ``dom_niid_bal-cls_iid_imb`` -> ``iun1``."""
    dc, db, cc, cb = _parts(resolve_scenario(name))
    return f"{_COR_CHAR[cc]}{_IMB_CHAR[cb]}{_COR_CHAR[dc]}{_IMB_CHAR[db]}"


_BY_CODE = {}
for _p in PRESETS:
    _dc, _db, _cc, _cb = _parts(_p)
    _BY_CODE[f"{_COR_CHAR[_cc]}{_IMB_CHAR[_cb]}{_COR_CHAR[_dc]}{_IMB_CHAR[_db]}"] = _p


def resolve_scenario(name: Any) -> str:
    """A preset name, or UniTTA's 4-character code of one (``i1n1``), as the preset name; one-line errors."""
    if isinstance(name, str) and name in PRESETS:
        return name
    if isinstance(name, str) and name in _BY_CODE:
        return _BY_CODE[name]
    raise ConfigError(f"unitta scenario must be one of the 36 presets dom_<iid|niid|cont>_<bal|imb>-cls_<iid|niid|"
                      f"cont>_<bal|imb> (e.g. dom_cont_bal-cls_iid_bal) or a UniTTA code like i1n1, got {name!r}")


def preset_factors(name: str, num_domains: int, num_classes: int) -> Dict[str, float]:
    """The four factors of a preset for ``num_domains`` domains and ``num_classes`` classes."""
    dc, db, cc, cb = _parts(resolve_scenario(name))
    sizes = {"domain": num_domains, "class": num_classes}

    def cor(kind: str, axis: str) -> float:
        return {"iid": 1.0 / sizes[axis], "niid": NIID_COR[axis], "cont": 1.0}[kind]

    return {"domain_cor": cor(dc, "domain"), "domain_imb": 1.0 if db == "bal" else IMBALANCE["domain"],
            "class_cor": cor(cc, "class"), "class_imb": 1.0 if cb == "bal" else IMBALANCE["class"]}


# ---------------------------------------------------------------- the chain

@dataclass(frozen=True)
class Axis:
    """One axis of the chain: ``size`` states, correlation ``cor`` (max self-transition) and imbalance ``imb``."""

    size: int
    cor: float
    imb: float

    @property
    def consistent(self) -> bool:
        """Whether the stationary distribution alone realises the imbalance (UniTTA's factor consistency)."""
        if self.size == 1:
            return False
        return self.cor < 1 and (1 - self.cor) * self.imb <= 1 - 1 / self.size + _EPS

    @property
    def ratios(self) -> np.ndarray:
        """Head-to-tail sample ratios ``imb^(-k/(K-1))``, normalised."""
        if self.size == 1:
            return np.ones(1)
        r = float(self.imb) ** (-np.arange(self.size) / (self.size - 1))
        return r / r.sum()

    @property
    def stay(self) -> np.ndarray:
        """Per-state self-transition probabilities ``c_k``."""
        if not self.consistent:
            return np.full(self.size, float(self.cor))
        # 1 - c_k = (1 - cor) * imb^(k/(K-1)): the head keeps cor, the tail 1 - imb (1 - cor)
        return 1 - (1 - self.cor) * float(self.imb) ** (np.arange(self.size) / (self.size - 1))

    @property
    def matrix(self) -> np.ndarray:
        """The K x K transition matrix: ``c_k`` on the diagonal, ``(1 - c_k) / (K - 1)`` elsewhere in row k."""
        k = self.size
        if k == 1:
            return np.ones((1, 1))
        c = self.stay
        m = np.repeat(((1 - c) / (k - 1))[:, None], k, axis=1)
        m[np.arange(k), np.arange(k)] = c
        return m


@dataclass(frozen=True)
class ChainSpec:
    """A UniTTA chain: the domain and class axes and the stopping size ``max_state_samples``."""

    num_domains: int
    num_classes: int
    domain_cor: float
    domain_imb: float
    class_cor: float
    class_imb: float
    max_state_samples: int

    def __post_init__(self) -> None:
        for key in ("num_domains", "num_classes", "max_state_samples"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"unitta {key} must be a positive integer, got {v!r}")
        for axis, k in (("domain", self.num_domains), ("class", self.num_classes)):
            cor, imb = getattr(self, f"{axis}_cor"), getattr(self, f"{axis}_imb")
            if isinstance(cor, bool) or not isinstance(cor, (int, float)) or not 0 <= cor <= 1:
                raise ConfigError(f"unitta {axis}_cor must be a number in [0, 1] (1/K i.i.d., larger correlated, 1 "
                                  f"continual), got {cor!r}")
            if cor < 1 / k - _EPS and k > 1:
                raise ConfigError(f"unitta {axis}_cor must be at least 1/{k} = {1 / k:.4g} (1/K is i.i.d.; below "
                                  f"it the chain would avoid repeating a state), got {cor!r}")
            if isinstance(imb, bool) or not isinstance(imb, (int, float)) or not imb >= 1 or not np.isfinite(imb):
                raise ConfigError(f"unitta {axis}_imb must be a number >= 1 (head / tail ratio), got {imb!r}")

    @property
    def domain(self) -> Axis:
        return Axis(self.num_domains, float(self.domain_cor), float(self.domain_imb))

    @property
    def klass(self) -> Axis:
        return Axis(self.num_classes, float(self.class_cor), float(self.class_imb))

    @property
    def matrix(self) -> np.ndarray:
        """The (D K) x (D K) state transition matrix ``D ⊗ C`` (state index ``d * K + c``)."""
        return np.kron(self.domain.matrix, self.klass.matrix)

    @property
    def upper_bounds(self) -> np.ndarray:
        """Per-state caps ``round(max_state_samples * r_d r_c / (r_0 r_0))`` (D x K)."""
        ratio = np.outer(self.domain.ratios, self.klass.ratios)
        return np.round(self.max_state_samples / ratio[0, 0] * ratio).astype(np.int64)

    @property
    def stop_rule(self) -> str:
        """``first_state`` (both axes consistent), ``state_caps``, ``domain_caps`` or ``class_caps``."""
        cd, cc = self.domain.consistent, self.klass.consistent
        if cd and cc:
            return "first_state"
        if not cd and not cc:
            return "state_caps"
        return "domain_caps" if not cd else "class_caps"


@dataclass
class ChainDraw:
    """A draw of the chain: the state sequence (``d * K + c``) and its statistics."""

    spec: ChainSpec
    states: np.ndarray
    runs: int = 0

    @property
    def domains(self) -> np.ndarray:
        return self.states // self.spec.num_classes

    @property
    def classes(self) -> np.ndarray:
        return self.states % self.spec.num_classes

    def state_counts(self) -> np.ndarray:
        """Visits per (domain, class): D x K."""
        n = self.spec.num_domains * self.spec.num_classes
        return np.bincount(self.states, minlength=n).reshape(self.spec.num_domains, self.spec.num_classes)

    def transition_counts(self, axis: Optional[str] = None) -> np.ndarray:
        """Counts of consecutive pairs: of states (axis None), or of the domain / class alone."""
        if axis is None:
            seq, k = self.states, self.spec.num_domains * self.spec.num_classes
        elif axis in AXES:
            seq = self.domains if axis == "domain" else self.classes
            k = self.spec.num_domains if axis == "domain" else self.spec.num_classes
        else:
            raise ConfigError(f"axis must be domain, class or None, got {axis!r}")
        return np.bincount(seq[:-1] * k + seq[1:], minlength=k * k).reshape(k, k)


def _fallback(spec: ChainSpec, valid: np.ndarray, s: int, rng: np.random.Generator) -> int:
    """The next state when the current one has no valid successor: next domain / class in order on a continual
    axis (next class of the same domain first when both are), else a uniformly drawn valid state."""
    k = spec.num_classes
    d, c = divmod(s, k)
    ok = valid.reshape(spec.num_domains, k)
    dom_cont, cls_cont = spec.domain_cor >= 1, spec.class_cor >= 1
    if dom_cont and cls_cont:
        for c2 in range(c + 1, c + k):
            if ok[d, c2 % k]:
                return d * k + c2 % k
        for d2 in range(d + 1, d + spec.num_domains + 1):
            d2 %= spec.num_domains
            if ok[d2].any():
                return d2 * k + int(np.flatnonzero(ok[d2])[0])
    cand = np.flatnonzero(valid)
    if dom_cont:
        nxt = next(d2 % spec.num_domains for d2 in range(d + 1, d + spec.num_domains + 1)
                   if ok[d2 % spec.num_domains].any())
        cand = cand[cand // k == nxt]
    elif cls_cont:
        nxt = next(c2 % k for c2 in range(c + 1, c + k + 1) if ok[:, c2 % k].any())
        cand = cand[cand % k == nxt]
    return int(cand[rng.integers(len(cand))])


def sample_chain(spec: ChainSpec, seed: int, max_steps: int = 50_000_000) -> ChainDraw:
    """Draw the state sequence of ``spec`` with UniTTA's stopping rule, seeded (numpy PCG64).

    Exact for the official dynamics (an exhausted state is never entered: a move is drawn from the row restricted
    to valid states) but drawn run by run: in state s the chain stays a geometric number of steps with success
    probability ``1 - P[s,s] / sum_valid P[s,:]``, truncated at the next cap, then jumps once.
    """
    rng = np.random.default_rng(stable_seed(seed, "unitta-chain") % 2 ** 63)
    nd, k = spec.num_domains, spec.num_classes
    dm, cm = spec.domain.matrix, spec.klass.matrix
    rule = spec.stop_rule
    bounds = spec.upper_bounds
    dom_cap, cls_cap, state_cap = bounds.sum(1), bounds.sum(0), bounds.ravel()
    valid = np.ones(nd * k, dtype=bool)  # a state whose cap rounds to 0 is never entered
    if rule == "state_caps":
        valid &= state_cap > 0
    elif rule == "domain_caps":
        valid &= np.repeat(dom_cap > 0, k)
    elif rule == "class_caps":
        valid &= np.tile(cls_cap > 0, nd)
    count = np.zeros(nd * k, dtype=np.int64)
    dom_total, cls_total = np.zeros(nd, dtype=np.int64), np.zeros(k, dtype=np.int64)
    run_states: List[int] = []
    run_lengths: List[int] = []
    s, total = 0, 0
    while True:
        d, c = divmod(s, k)
        row = np.outer(dm[d], cm[c]).ravel() * valid  # the Kronecker row, restricted to the valid states
        z = row.sum()
        q = row[s] / z if z > 0 else 1.0
        length = np.inf if q >= 1 - _EPS else int(rng.geometric(1 - q))
        if rule == "first_state":
            room = spec.max_state_samples - count[s]
        elif rule == "state_caps":
            room = state_cap[s] - count[s]
        elif rule == "domain_caps":
            room = dom_cap[d] - dom_total[d]
        else:
            room = cls_cap[c] - cls_total[c]
        take = int(min(length, room))
        if take > 0:
            run_states.append(s)
            run_lengths.append(take)
            count[s] += take
            dom_total[d] += take
            cls_total[c] += take
            total += take
        if total > max_steps:
            raise ConfigError(f"unitta chain exceeded {max_steps} samples; use a smaller max_state_samples")
        if take >= room:  # s (or its domain / class) is exhausted
            if rule == "first_state":
                break
            if rule == "state_caps":
                valid[s] = False
            elif rule == "domain_caps":
                valid[d * k:(d + 1) * k] = False
            else:
                valid[c::k] = False
            if not valid.any():
                break
            row = np.outer(dm[d], cm[c]).ravel() * valid
            if rule == "state_caps" and row.sum() > 0:
                s = int(np.searchsorted(np.cumsum(row), rng.random() * row.sum(), side="right"))
            else:  # official: the rows of an exhausted domain / class are zeroed -> the fallback
                s = _fallback(spec, valid, s, rng)
            continue
        row[s] = 0.0  # a jump: to another valid state, with the row's odds
        cum = np.cumsum(row)
        s = int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(cum) - 1))
    states = np.repeat(np.asarray(run_states, dtype=np.int64), np.asarray(run_lengths, dtype=np.int64))
    return ChainDraw(spec, states, runs=len(run_states))


def pool_positions(draw: ChainDraw, members: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """For every sample of ``draw``, its image: the visit-th entry of a seeded permutation of ``members[c]`` (the
    clean indices of class c) for its (domain, class), cycled when the pool runs out."""
    states = draw.states
    k = draw.spec.num_classes
    order = np.argsort(states, kind="stable")
    sorted_states = states[order]
    starts = np.searchsorted(sorted_states, sorted_states, side="left")
    rank = np.empty(len(states), dtype=np.int64)
    rank[order] = np.arange(len(states)) - starts
    out = np.empty(len(states), dtype=np.int64)
    for s in np.unique(states):
        d, c = divmod(int(s), k)
        pool = np.asarray(members[c])
        if len(pool) == 0:
            raise ConfigError(f"unitta: class {c} has no image to sample")
        perm = np.random.default_rng(stable_seed(seed, "unitta-pool", d, c) % 2 ** 63).permutation(pool)
        at = states == s
        out[at] = perm[rank[at] % len(pool)]
    return out


# ---------------------------------------------------------------- the stream

DATASETS = ("digits", "cifar10", "cifar100")
DEFAULT_CORRUPTIONS = {"digits": "gaussian_noise,shot_noise,impulse_noise,brightness,contrast"}
DEFAULT_MAX_STATE = {"digits": 50, "cifar10": 1000, "cifar100": 100}  # cifar: UniTTA's sh/run.sh


def _check_int(v: Any, key: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"unitta {key} must be an integer >= {lo}, got {v!r}")
    return int(v)


def chain_spec(num_domains: int, num_classes: int, scenario: Optional[str], domain_cor: Optional[float],
               domain_imb: Optional[float], class_cor: Optional[float], class_imb: Optional[float],
               max_state_samples: int) -> Tuple[ChainSpec, Optional[str]]:
    """The chain of a scenario (its factors; explicit factors override them) or of explicit factors alone."""
    given = {"domain_cor": domain_cor, "domain_imb": domain_imb, "class_cor": class_cor, "class_imb": class_imb}
    if scenario is not None:
        name = resolve_scenario(scenario)
        factors = {**preset_factors(name, num_domains, num_classes), **{k: v for k, v in given.items()
                                                                          if v is not None}}
    else:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"unitta needs a scenario (one of the 36 presets) or all four factors; missing "
                              f"{', '.join(missing)}")
        name, factors = None, given
    return ChainSpec(num_domains, num_classes, max_state_samples=max_state_samples, **factors), name


def unitta_stream(dataset: str = "digits", corruptions: Union[str, Sequence[str], None] = None, severity: int = 5,
                  scenario: Optional[str] = "dom_iid_bal-cls_iid_bal", domain_cor: Optional[float] = None,
                  domain_imb: Optional[float] = None, class_cor: Optional[float] = None,
                  class_imb: Optional[float] = None, num_classes: Optional[int] = None,
                  max_state_samples: Optional[int] = None, batch_size: int = 64, seed: int = 1,
                  data_root: Optional[str] = None, download: bool = False, generate_missing: bool = True) -> Stream:
    """UniTTA's unified scenarios: one adapt segment whose (domain, class) sequence follows a Markov chain.

    ``scenario`` names one of the 36 presets (or UniTTA's code, ``i1n1``); explicit ``domain_cor`` / ``domain_imb``
    / ``class_cor`` / ``class_imb`` override its factors (``scenario: null`` needs all four). ``num_classes`` keeps
    the first k classes of the dataset; ``max_state_samples`` sets the length (the official stopping rule).
    """
    from .corruption_stream import _corruption_list
    from .corruptions import corrupt

    if dataset not in DATASETS:
        raise ConfigError(f"unitta dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if not isinstance(severity, int) or isinstance(severity, bool) or not 1 <= severity <= 5:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
    batch_size = _check_int(batch_size, "batch_size")
    seed = _check_int(seed, "seed", 0)
    max_state = _check_int(DEFAULT_MAX_STATE[dataset] if max_state_samples is None else max_state_samples,
                           "max_state_samples")
    if not isinstance(generate_missing, bool):
        raise ConfigError(f"generate_missing must be true or false, got {generate_missing!r}")
    names = _corruption_list(corruptions if corruptions is not None else DEFAULT_CORRUPTIONS.get(dataset, "all"))
    if len(set(names)) != len(names):
        raise ConfigError(f"unitta corruptions must be distinct (each is one domain), got {names}")
    # validate the chain before reading any data
    if num_classes is not None:
        _check_int(num_classes, "num_classes")
    probe_k = num_classes or {"digits": 10, "cifar10": 10, "cifar100": 100}[dataset]
    chain_spec(len(names), probe_k, scenario, domain_cor, domain_imb, class_cor, class_imb, max_state)
    if dataset == "digits":
        from .digits import load_digits

        clean, files = load_digits(train=False), None
    else:
        from .datasets import load_cifar, load_corrupted

        clean = load_cifar(dataset, data_root, train=False, download=download)
        root = Path(data_root).expanduser() if data_root else None

        def files(c: str, s: int):
            return load_corrupted(dataset, root, c, s)
    all_classes = len(clean.classes)
    k = all_classes if num_classes is None else num_classes
    if k > all_classes:
        raise ConfigError(f"unitta num_classes {k} exceeds the {all_classes} classes of {dataset}")
    spec, name = chain_spec(len(names), k, scenario, domain_cor, domain_imb, class_cor, class_imb, max_state)
    draw = sample_chain(spec, seed)
    labels = clean.labels.long().numpy()
    members = [np.flatnonzero(labels == c) for c in range(k)]
    clean_idx = pool_positions(draw, members, seed)
    doms = draw.domains
    blocks: List[Block] = []
    order = np.empty(len(clean_idx), dtype=np.int64)
    offset = 0
    provenance: Dict[str, Dict[str, Any]] = {}
    for d, c in enumerate(names):
        at = doms == d
        used = np.unique(clean_idx[at])
        rows = torch.from_numpy(used).long()
        order[at] = offset + np.searchsorted(used, clean_idx[at])
        offset += len(used)
        pre = files(c, severity) if files is not None else None
        if pre is not None:
            if len(pre) != len(clean) or not torch.equal(pre.labels.long(), clean.labels.long()):
                raise ConfigError(f"the -C file of {c} (severity {severity}) does not match the clean test set")
            images = pre.images[rows].clone() if isinstance(pre.images, Tensor) else pre.images
            blk_rows = torch.arange(len(used)) if isinstance(pre.images, Tensor) else rows
            blocks.append(Block(images, blk_rows, clean.labels[rows].long(), group=d))
            provenance[f"{c}-{severity}"] = {"source": "files", "path": pre.source, "corruption": c,
                                             "severity": severity}
            continue
        if files is not None and not generate_missing:
            raise ConfigError(f"generate_missing is false but there is no -C file of {c} (severity {severity})")

        def transform(x: Tensor, name_: str = c) -> Tensor:
            return corrupt(x, name_, severity, seed=seed, params="cifar10")
        blocks.append(Block(clean.images, rows, clean.labels[rows].long(), group=d, transform=transform))
        provenance[f"{c}-{severity}"] = {"source": "generated", "engine": "ctta.streams.corruptions",
                                         "params": "cifar10", "corruption": c, "severity": severity}
    counts = draw.state_counts()
    state_n = np.bincount(draw.states, minlength=len(names) * k)
    repeats = int(np.maximum(state_n.reshape(len(names), k) - np.array([len(m) for m in members])[None, :], 0).sum())
    stats = {"num_samples": int(len(draw.states)), "domain_counts": counts.sum(1).tolist(),
             "class_counts": counts.sum(0).tolist(), "stop_rule": spec.stop_rule,
             "consistent": {"domain": spec.domain.consistent, "class": spec.klass.consistent},
             "repeated_samples": repeats, "runs": draw.runs}
    meta = {"scenario": name, "unitta_code": unitta_code(name) if name else None, **stats,
            "state_counts": counts.tolist(),
            "domain_transitions": draw.transition_counts("domain").tolist(),
            "class_transitions": draw.transition_counts("class").tolist()}
    groups = [f"{c}-{severity}" for c in names]
    seg = gathered_segment(f"unitta-{name or 'custom'}", "adapt", blocks, batch_size,
                           order=torch.from_numpy(order), groups=groups, meta=meta)
    full_spec = {"name": "unitta", "dataset": dataset, "corruptions": names, "severity": severity,
                 "scenario": name, "unitta_code": unitta_code(name) if name else None,
                 "domain_cor": spec.domain_cor, "domain_imb": spec.domain_imb, "class_cor": spec.class_cor,
                 "class_imb": spec.class_imb, "num_classes": k, "max_state_samples": max_state,
                 "batch_size": batch_size, "seed": seed, "data_root": str(data_root) if data_root else None,
                 **stats}
    return Stream(name="unitta", segments=[seg], num_classes=all_classes, setting="tta", spec=full_spec,
                  provenance=provenance)


STREAMS.register("unitta", unitta_stream)

__all__ = ["Axis", "ChainDraw", "ChainSpec", "PRESETS", "chain_spec", "pool_positions", "preset_factors",
           "resolve_scenario", "sample_chain", "unitta_code", "unitta_stream"]
