"""The one way this package makes an AdamW: ``torch.optim.AdamW`` with PyTorch's own choice of kernel,
except for a parameter list that mixes sharded and plain tensors.

``foreach=None`` lets PyTorch choose: the multi-tensor (foreach) kernel for accelerator tensors, a Python
loop over the tensors on the CPU; on the CPU both give the same update bit for bit (``tests/test_optim.py``).
``fused=True`` is not used: its kernel rounds differently, and a rounding change moves a run's results.

A list that mixes FSDP2's DTensors with plain tensors (a replicated head beside a sharded network, e.g.
DMD2's classifier in the fake score's optimizer) cannot go through one foreach kernel ("got mixed
torch.Tensor and DTensor"), and PyTorch's default would pick foreach for it on CUDA (DTensor is registered
as foreach-capable), so such a list steps tensor by tensor (``foreach=False``; the same update).
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
