"""Seeds derived from several parts (a run seed, a domain name, ...), stable across processes unlike ``hash``."""
from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``: the same parts give the same seed in every process and on every machine."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def same_device(a: "torch.device", b: "torch.device") -> bool:
    """Whether two devices are the same, treating ``cuda`` as the current CUDA device (``cuda:N``)."""
    import torch

    def norm(d: torch.device) -> tuple:
        d = torch.device(d)
        if d.type == "cuda" and d.index is None:
            return ("cuda", torch.cuda.current_device())
        return (d.type, d.index if d.index is not None else 0)

    return norm(a) == norm(b)
