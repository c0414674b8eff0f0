"""Seeds derived from several parts (a run seed, a domain name, ...), stable across processes unlike ``hash``."""
from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``: the same parts give the same seed in every process and on every machine."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
