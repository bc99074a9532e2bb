"""The one way this package makes an AdamW: ``torch.optim.AdamW`` with PyTorch's fused kernel
(``fused=True``), except for a list that mixes sharded and plain parameters.

The fused kernel does AdamW's whole update of all the tensors in one kernel per device (CPU, CUDA and
the other accelerators PyTorch ships it for); torchtitan's training configurations choose it too.  On the 2-core CPU
it made the toy teacher's whole step 1.11–1.19× faster than PyTorch's default there (a Python loop of
small kernels per tensor and moment; ``benchmarks/cpu_speed.py --compare fused``, side by side on an
idle machine).  It rounds differently from the loop and from the multi-tensor (foreach) kernel (the
update is the same formula; the two runs' losses drift apart by ~2e-3 over 80 steps), so switching to it
changed every trained model by rounding: the demo's scores before and after the switch are compared in
the stop-26 note.  It is deterministic; an element's update is the same whichever rank's shard holds it
when the shards hold whole SIMD vectors, and within 1e-6 otherwise (a shard's scalar tail rounds apart;
``tests/test_optim.py``).

One exception: a parameter list that mixes sharded parameters (FSDP2's DTensors) with plain tensors (a
replicated head beside a sharded network, e.g. DMD2's classifier in the fake score's optimizer) cannot
go through one fused or foreach kernel ("got mixed torch.Tensor and DTensor"), so it steps tensor by
tensor (``foreach=False``: the same formula, rounded as the loop rounds).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.Tensor], lr: float, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, lr, fused=True, **kwargs)``, or tensor by tensor where ``params``
    mixes DTensors and plain tensors (module docstring)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    sharded = {isinstance(p, DTensor) for p in params}
    kernel = {"fused": True} if len(sharded) <= 1 else {"foreach": False}
    return torch.optim.AdamW(params, lr=lr, **kernel, **kwargs)
