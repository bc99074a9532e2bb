"""The package's AdamW (foreach left to PyTorch: the per-tensor loop on the CPU) and the foreach kernel take
the same steps as PyTorch's default CPU AdamW, bit for bit, weights and moments alike: the path changes no
result."""

from __future__ import annotations

import torch

from dcm.distill.optim import adamw


def test_the_package_adamw_and_the_foreach_kernel_are_bitwise_the_default_cpu_adamw():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 5), (1,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    runs = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3),
                 lambda p: adamw(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3),
                 lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3, foreach=True)):
        params = [w.clone().requires_grad_(True) for w in start]
        optimizer = make(params)
        for step in range(12):
            for p, g in zip(params, grads[step % 4]):
                p.grad = g.clone()
            optimizer.step()
        runs.append((params, optimizer.state_dict()))
    (default, default_state), *others = runs
    assert runs[1][1]["param_groups"][0]["foreach"] is None  # PyTorch's choice: the loop on the CPU
    for params, state_dict in others:
        assert all(torch.equal(a, b) for a, b in zip(default, params))
        for k, state in default_state["state"].items():
            assert all(torch.equal(state[name], state_dict["state"][k][name])
                       for name in ("exp_avg", "exp_avg_sq", "step"))


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
        assert adamw([sharded], lr=1e-3).param_groups[0]["foreach"] is None
        assert adamw([plain], lr=1e-3).param_groups[0]["foreach"] is None
    finally:
        if started:
            dist.destroy_process_group()
