"""Agreement of our LAME with the reference benchmark's: now ``reference_agreement.py --methods lame``.

Kept so the command of benchmarks/RESULTS.md (LAME, 2026-12-01) still runs; it takes the same arguments as
``benchmarks/reference_agreement.py`` (``--dirichlet``, ``--pool`` ...), with LAME as the method and seed 0 (the
seed of that table) unless given.

    python benchmarks/lame_reference.py --reference /tmp/lame_ref/classification --stand-ins /tmp/lame_ref/stand \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 \\
        --corruptions gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression --num-samples 2000
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference_agreement import ReferenceView, main as _main  # noqa: E402,F401  (ReferenceView kept importable)


def main(argv=None) -> int:
    return _main(["--methods", "lame", "--seed", "0", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
