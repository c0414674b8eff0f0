"""The 15 common corruptions of CIFAR-10-C / ImageNet-C (and the 4 extras), generated on the device.

``corrupt(images, name, severity, seed)`` is the one entry point; ``core`` holds the registry and checks, ``rng``
the per-image random numbers, ``filters`` the shared filtering, and one module per family registers its
corruptions on import. A name of :data:`CORRUPTION_ORDER` not generated yet still loads from released -C files.
"""
import importlib
import pkgutil

from .core import (
    CORRUPTION_ORDER,
    CORRUPTIONS,
    EXTRA_ORDER,
    PARAM_SETS,
    SEVERITIES,
    Corruption,
    corrupt,
    corruption_seed,
    generated_corruptions,
    quantize_8bit,
    register_corruption,
)
from .rng import ImageRng, content_keys

# Registration: every other module of this package is a family of corruptions and registers them on import.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("core", "rng", "filters") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

# The remaining names are known (their -C files load) but not generated yet: registering one with
# @register_corruption in its family module makes this loop skip it.
for _name in CORRUPTION_ORDER:
    if _name not in CORRUPTIONS:
        CORRUPTIONS.register(_name, Corruption(_name, None),
                             help="not generated yet: read from the released -C files under --data-root")
del _name, _info

__all__ = ["CORRUPTIONS", "CORRUPTION_ORDER", "EXTRA_ORDER", "PARAM_SETS", "SEVERITIES", "Corruption", "ImageRng", "content_keys",
           "corrupt", "corruption_seed", "generated_corruptions", "quantize_8bit", "register_corruption"]
