"""Load a local ``torch.save`` checkpoint into a network, turning every way it can fail into one readable error."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..errors import CheckpointError

log = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5


def read_checkpoint(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; falls back to full unpickling (logged, with the reason) if refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning("checkpoint %s holds more than tensors and plain containers (%s), so weights_only=True refuses "
                    "it; loading it with full unpickling, which can run code stored in the file: use only "
                    "checkpoints you trust", path, _refusal_reason(e))
    except Exception as e:  # not a torch.save file, truncated, ...
        raise CheckpointError(_unreadable(path, e)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(_unreadable(path, e)) from None


def extract_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a raw state dict, a dict under ``state_dict``/``model``/``net``, or a module."""
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
        inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    odd = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd or not obj:
        raise CheckpointError(f"checkpoint {path} has no state dict: expected tensors, or one of the keys "
                              f"{'/'.join(STATE_DICT_KEYS)}; top-level keys: {_few(list(map(str, obj)))}")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        for p in STRIPPED_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def existing_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path when it is a file; a one-line CheckpointError otherwise (checked before any data is read)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    return path


def load_checkpoint(net: nn.Module, path: str | Path, backbone: Optional[str] = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``net`` (strictly) and return ``net``; raises :class:`CheckpointError`."""
    from .classifier import Classifier

    path = existing_checkpoint(path)
    name = backbone or getattr(net, "name", None) or type(net).__name__
    state = extract_state_dict(read_checkpoint(path), path)
    target = net.net if isinstance(net, Classifier) else net
    expected = target.state_dict()
    if all(k.startswith("net.") for k in state) and not any(k.startswith("net.") for k in expected):
        state = {k[len("net."):]: v for k, v in state.items()}  # a whole Classifier's state dict
    for k in expected:  # checkpoints from before BatchNorm counted its batches
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = expected[k].clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch_message(path, name, missing, unexpected, shapes))
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit backbone {name}: {_first_line(e)}") from None
    log.info("loaded checkpoint %s into %s (%d tensors)", path, name, len(state))
    return net


def _mismatch_message(path: Path, name: str, missing: List[str], unexpected: List[str], shapes: List[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {_few(shapes)}")
    hint = " (a checkpoint for another architecture or another number of classes?)"
    return f"checkpoint {path} does not fit backbone {name}: " + "; ".join(parts) + hint


def _few(items: List[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def _refusal_reason(e: BaseException) -> str:
    """The informative line of torch's weights_only refusal (it names the offending global)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)
    return found.split(". Please use")[0].replace("WeightsUnpickler error: ", "")


def _unreadable(path: Path, e: BaseException) -> str:
    return (f"cannot read checkpoint {path}: not a torch.save file, or a damaged one "
            f"({type(e).__name__}: {_first_line(e)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
