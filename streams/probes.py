"""Forgetting probes of test-time streams: the probe modes, their checks and the held-out count (docs/streams.md)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ctta.errors import ConfigError

PROBES = ("none", "clean", "seen", "all")


def check_probes(probes: Optional[str], probe_samples: Any, clean_eval: bool = False, order: str = "continual",
                 rounds: int = 1, allowed: Sequence[str] = PROBES, what: str = "") -> str:
    """The probe mode: ``none``, ``clean`` (clean@start / clean@end), ``seen`` or ``all`` (after every domain, the
    held-out images of the clean set and of the domains seen so far / of every domain); one-line errors.
    ``allowed`` narrows the modes for streams without a clean set (``what`` names them in the error)."""
    if probes is None:
        return "clean" if clean_eval else "none"
    if probes not in allowed:
        raise ConfigError(f"probes must be one of {', '.join(allowed)}{f' for {what}' if what else ''}, got "
                          f"{probes!r}")
    if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 1:
        raise ConfigError(f"probe_samples must be a positive integer, got {probe_samples!r}")
    if probes in ("seen", "all") and (order == "mixed" or rounds > 1):
        raise ConfigError(f"probes: {probes} needs one segment per domain and one round; order {order!r} with "
                          f"{rounds} round(s) mixes or repeats domains (use probes: clean, or interleave_clean)")
    return probes


def probe_count(probe_samples: int, batch_size: int) -> int:
    """Held-out images per probe group: ``probe_samples`` rounded down to whole batches (so a probe batch never
    mixes two domains), or all of it when it is less than one batch."""
    return probe_samples // batch_size * batch_size if probe_samples >= batch_size else probe_samples
