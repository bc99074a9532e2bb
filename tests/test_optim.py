"""The package's AdamW: PyTorch's fused kernel, the same formula as PyTorch's default AdamW (within
rounding), deterministic, and per element the same whatever split of a tensor into whole-vector shards; a list mixing sharded
and plain parameters steps tensor by tensor."""

from __future__ import annotations

import torch

from dcm.distill.optim import adamw


def _steps(make, start, grads, split=None):
    params = [w.clone().requires_grad_(True) for w in start]
    if split is not None:  # each tensor cut into row blocks, as ranks would hold its shards
        params = [c.clone().requires_grad_(True) for w in start for c in w.split(split)]
    optimizer = make(params)
    for step in range(12):
        grads_now = grads[step % 4] if split is None else [c for g in grads[step % 4] for c in g.split(split)]
        for p, g in zip(params, grads_now):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def test_the_package_adamw_is_the_fused_kernel_and_the_default_update_within_rounding():
    torch.manual_seed(0)
    shapes = [(67, 33), (67,), (67, 3, 5)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3)
    ours, optimizer = _steps(lambda p: adamw(p, **hyper), start, grads)
    assert optimizer.param_groups[0]["fused"] is True
    default, _ = _steps(lambda p: torch.optim.AdamW(p, **hyper), start, grads)
    fused, _ = _steps(lambda p: torch.optim.AdamW(p, fused=True, **hyper), start, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    for a, b in zip(ours, default):  # the same formula: 12 steps of lr 1e-2 agree to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # an element's update does not depend on how its tensor is cut into ranks' shards when the pieces
    # hold whole SIMD vectors (here 1024-element blocks); other cuts round a scalar tail differently
    # (within 1e-6 of the uncut update)
    aligned = [torch.randn(64, 32), torch.randn(128)]
    aligned_grads = [[torch.randn_like(w) for w in aligned] for _ in range(4)]
    uncut, _ = _steps(lambda p: adamw(p, **hyper), aligned, aligned_grads)
    for split, exact in ((32, True), (7, False)):
        cut, _ = _steps(lambda p: adamw(p, **hyper), aligned, aligned_grads, split=split)
        rows = iter(cut)
        for whole in uncut:
            joined = torch.cat([next(rows) for _ in range(-(-whole.shape[0] // split))])
            if exact:
                assert torch.equal(whole, joined)
            else:
                torch.testing.assert_close(whole, joined, rtol=1e-6, atol=1e-6)


def test_a_mix_of_sharded_and_plain_parameters_steps_tensor_by_tensor():
    """FSDP2's DTensors beside a replicated head's plain tensors cannot share one foreach kernel."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
        plain = torch.nn.Parameter(torch.randn(3))
        mixed = adamw([sharded, plain], lr=1e-3)
        assert mixed.param_groups[0]["foreach"] is False
        sharded.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
        plain.grad = torch.ones(3)
        mixed.step()  # no "mixed torch.Tensor and DTensor" error
        assert adamw([sharded], lr=1e-3).param_groups[0]["fused"] is True
        assert adamw([plain], lr=1e-3).param_groups[0]["fused"] is True
    finally:
        if started:
            dist.destroy_process_group()
