"""A run's fingerprint: what it ran with (versions, commit, device, data files, weights, settings), in summary.json.

Reproduction failures in this field trace to unrecorded settings (library versions, 5k vs 50k images, a backbone
variant, a corruption engine that changed). Every run records them; ``ctta-bench report`` warns, naming the field,
when the runs it compares differ in anything but strategy and seed (:func:`fingerprint_differences`).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import flatten

PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "pandas", "avalanche-lib")
HEAD_BYTES = 1 << 20  # data files are identified by size and a hash of their first MiB
#: config keys that say how to run, not what is computed (never in the setup a comparison checks)
VOLATILE = ("run.out", "run.resume", "run.force", "run.progress", "run.device", "run.chunk_size", "run.seed",
            "stream.workers", "stream.seed", "run.loggers")


def package_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the libraries a result depends on (None: not installed), and ctta-bench's own."""
    from ctta import __version__

    out: Dict[str, Optional[str]] = {"ctta-bench": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(folder: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """The project's git commit and whether its tracked files have changes, when it runs from a checkout."""
    folder = folder or Path(__file__).resolve().parents[1]
    if not (folder / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def file_digest(path: str | Path, whole: bool = False) -> Dict[str, Any]:
    """Size and SHA-256 of a file (of its first MiB unless ``whole``); a folder gives its entry count."""
    p = Path(path)
    if p.is_dir():
        return {"path": str(p), "folder": True, "entries": sum(1 for _ in p.iterdir())}
    if not p.is_file():
        return {"path": str(p), "missing": True}
    h = hashlib.sha256()
    with p.open("rb") as f:
        if whole:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f.read(HEAD_BYTES))
    return {"path": str(p), "bytes": p.stat().st_size, ("sha256" if whole else "sha256_head"): h.hexdigest()}


def corruption_engine() -> str:
    """A hash of the corruption engine's source: generated data changes when it does."""
    folder = Path(__file__).resolve().parents[1] / "streams" / "corruptions"
    if not folder.is_dir():  # installed without sources beside ctta/ (a wheel): the package version stands for it
        from ctta.streams import corruptions

        folder = Path(corruptions.__file__).parent
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def setup(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The resolved config without the strategy and the how-to-run keys: what runs being compared must share."""
    flat = flatten({k: v for k, v in config.items() if k != "strategy"})
    return {k: v for k, v in sorted(flat.items()) if not any(k == x or k.startswith(x + ".") for x in VOLATILE)}


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the whole resolved config (strategy included), how-to-run keys aside."""
    flat = {k: v for k, v in flatten(config).items() if not any(k == x or k.startswith(x + ".") for x in VOLATILE)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(config: Mapping[str, Any], provenance: Mapping[str, Mapping[str, Any]],
                device: torch.device) -> Dict[str, Any]:
    """Everything a result depends on besides the code path taken: see the module docstring."""
    dev = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           "cpu", "dtype": str(torch.get_default_dtype()).replace("torch.", "")}
    data: Dict[str, Any] = {}
    generated = False
    for domain, src in (provenance or {}).items():
        entry = dict(src)
        if src.get("source") == "files" and src.get("path"):
            entry.update(file_digest(src["path"]))
        generated = generated or src.get("source") == "generated"
        data[str(domain)] = entry
    out: Dict[str, Any] = {"packages": package_versions(), "python": sys.version.split()[0], "git": git_commit(),
                           "device": dev, "data": data, "config_sha256": config_hash(config),
                           "setup": setup(config)}
    if generated:
        out["corruption_engine"] = corruption_engine()
    weights = (config.get("backbone") or {}).get("weights")
    if weights:
        out["weights"] = file_digest(weights, whole=True)
    return out


#: the config hash holds the strategy; a dirty flag alone is noise; offline vs realtime rows are compared on purpose
IGNORED = ("config_sha256", "git.dirty", "setup.run.protocol")


def fingerprint_differences(fingerprints: Sequence[Tuple[str, Optional[Mapping[str, Any]]]]) -> List[str]:
    """One line per fingerprint field in which the runs differ (strategy and seed aside), naming two values."""
    known = [(name, flatten(fp)) for name, fp in fingerprints if fp]
    if len(known) < 2:
        return []
    lines = []
    first_name, first = known[0]
    keys = sorted(set().union(*[set(f) for _, f in known]))
    for key in keys:
        if key in IGNORED or key.startswith("data.") and key.endswith(".path"):
            continue
        other = next(((n, f) for n, f in known[1:] if f.get(key) != first.get(key)), None)
        if other is not None:
            lines.append(f"runs differ in {key}: {first.get(key)!r} ({first_name}) vs {other[1].get(key)!r} "
                         f"({other[0]})")
    return lines
