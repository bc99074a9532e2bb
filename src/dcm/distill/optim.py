"""The one way this package makes an AdamW: ``torch.optim.AdamW`` with PyTorch's own choice of kernel,
except for a list that mixes sharded and plain parameters.

PyTorch picks the multi-tensor (foreach) implementation by default for accelerator tensors; on the CPU
it loops over the parameters in Python, one small kernel per tensor and moment.  Both compute the same
update, bitwise (``tests/test_optim.py``).  Measured on the 2-core CPU (``benchmarks/cpu_speed.py``, side
by side, the machine otherwise idle), the toy teacher's whole step ran at 9.66 (loop) vs 9.51 (foreach)
steps/s one day and 8.54 vs 8.10 another (median ratio 0.96×); the optimizer step alone for the toy
teacher's 8.6 M parameters took 14.5 ms looping and 28.1 ms foreach (it was faster only under heavy load
from other jobs, 172 vs 396 ms).  So the CPU keeps PyTorch's loop (``foreach=None``: the default).
``fused=True`` is not used: its CPU kernel rounds differently (not bitwise equal; 4.6 ms, and the whole
step 1.11–1.19× faster, with the two runs' losses 3e-3 apart after 120 steps), and a rounding change is
not a small change here: a whole ``make demo`` with it (2026-12-03, same machine) moved 13 of 32 headline
figures outside the loop run's 95% intervals (teacher-50 Total 90.23 → 88.76, PCM-4 90.08 → 88.14,
MCM-4 85.38 → 88.36; ``benchmarks/compare_runs.py``).  Those intervals cover the evaluation rows, not
training's own sensitivity, so the kernel stays the one every earlier result was computed with.

One exception: a parameter list that mixes sharded parameters (FSDP2's DTensors) with plain tensors (a
replicated head beside a sharded network, e.g. DMD2's classifier in the fake score's optimizer) cannot
go through one foreach kernel ("got mixed torch.Tensor and DTensor"), so it steps tensor by tensor
(``foreach=False``; the same update).  On CUDA PyTorch's own default would pick foreach for such a list
(``torch.distributed.tensor`` registers DTensor as foreach-capable) and fail.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.Tensor], lr: float, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, lr, **kwargs)``, PyTorch's default kernel, or tensor by tensor where
    ``params`` mixes DTensors and plain tensors (module docstring)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    sharded = {isinstance(p, DTensor) for p in params}
    return torch.optim.AdamW(params, lr=lr, foreach=None if len(sharded) <= 1 else False, **kwargs)
