"""The one way this package makes an AdamW: ``torch.optim.AdamW`` with ``foreach=True``.

PyTorch picks the multi-tensor (foreach) implementation by default only for accelerator tensors; on the
CPU it falls back to a Python loop over the parameters, one small kernel per tensor and moment.  The
foreach path computes the same update (the same operations in the same order, batched over the
tensors): ``tests/test_optim.py`` holds every step bitwise equal to the default's, so a run's numbers do
not change, only its speed (the toy teacher's 127 tensors: ~2× faster steps of the optimizer on this
2-core CPU, ``benchmarks/cpu_speed.py``).  On CUDA it is what PyTorch already chooses.  ``fused=True``
is not used: its CPU kernel rounds differently (not bitwise equal).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable, lr: float, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, lr, **kwargs)`` on the multi-tensor path (module docstring)."""
    return torch.optim.AdamW(params, lr=lr, foreach=True, **kwargs)
