"""Data parallelism on PyTorch's own engines, torchtitan style: ``training.parallel`` and the world size
give a ``ParallelDims`` (the degrees, checked to multiply to the world size), the dims a named
``DeviceMesh``, and one ``parallelize`` wraps a model for the training loop, which never asks how:

- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on the root, over the 1-D mesh
  ``(dp_shard,)``: each rank holds 1/N of every parameter, gradient and Adam moment (context-parallel
  ranks, a trailing ``cp`` dimension, are folded into the shard dimension);
- ``hsdp``: the same over the 2-D mesh ``(dp_replicate, dp_shard)``: sharded within groups of
  ``shard_group_size`` ranks (a node), replicated across groups;
- ``ddp``: ``replicate`` (composable DDP: bucketed gradient all-reduce overlapped with backward).

The transformer blocks are the modules diffusers itself names as the units not to split
(``_no_split_modules``: what accelerate's FSDP auto-wrap uses) inside every diffusers transformer of
the model, so expert / PEFT wrappers and a second full expert are covered.  Frozen models (the
teacher, an EMA target) may be wrapped too: FSDP2 shards frozen parameters and never reduces them.

At world size 1 nothing is built and nothing is wrapped: a single process computes exactly what it
computed before any of this existed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dcm.backbones.base import transformer_blocks
from dcm.config import (
    SHARDED,
    ConfigError,
    ParallelConfig,
    Params,
    folder_transformer_config,
    transformer_patch,
    vae_spatial_compression,
)

KEY = "training.parallel"


# ------------------------------------------------------------------------------------ degrees


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one job: dp_replicate × dp_shard × cp = world size."""

    strategy: str
    world_size: int
    dp_replicate: int
    dp_shard: int
    cp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int,
                    local_world_size: int | None = None) -> ParallelDims:
        """The degrees ``cfg`` asks for at ``world_size`` ranks; a ``ConfigError`` names what does not
        divide."""
        if world_size % cfg.context_parallel:
            raise ConfigError(f"{KEY}.context_parallel", cfg.context_parallel,
                              f"a divisor of the world size ({world_size} ranks)")
        dp = world_size // cfg.context_parallel
        if cfg.strategy == "ddp":
            return cls("ddp", world_size, dp, 1, cfg.context_parallel)
        if cfg.strategy == "fsdp":
            return cls("fsdp", world_size, 1, dp, cfg.context_parallel)
        shard = cfg.shard_group_size or min(local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", dp)),
                                            dp)
        if dp % shard:
            raise ConfigError(f"{KEY}.shard_group_size",
                              cfg.shard_group_size if cfg.shard_group_size else shard,
                              f"a divisor of the data-parallel ranks ({world_size} ranks / context_parallel "
                              f"{cfg.context_parallel} = {dp})")
        return cls("hsdp", world_size, dp // shard, shard, cfg.context_parallel)

    @property
    def dp_size(self) -> int:
        """Ranks that see different samples (the global batch is batch_size × dp_size)."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED and self.world_size > 1

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(sizes, names) of the mesh: (dp_shard,) for fsdp, (dp_replicate,) for ddp, (dp_replicate,
        dp_shard) for hsdp, each with a trailing cp dimension when context_parallel > 1."""
        dims = {"ddp": [("dp_replicate", self.dp_replicate)], "fsdp": [("dp_shard", self.dp_shard)],
                "hsdp": [("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard)]}[self.strategy]
        if self.cp > 1:
            dims.append(("cp", self.cp))
        return tuple(size for _, size in dims), tuple(name for name, _ in dims)

    def build_mesh(self):
        """The named ``DeviceMesh`` over this job's ranks (None at world size 1)."""
        if self.world_size <= 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        sizes, names = self.mesh_shape()
        return init_device_mesh(device_type(), sizes, mesh_dim_names=names)


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def token_count(params: Params) -> int | None:
    """Video tokens of one sample at the run's size (latent frames × rows × columns / patch), from the
    params and the transformer's config.json; None where the config cannot be read without loading."""
    bb = params.backbone
    if bb.family == "toy":
        f, (pt, ph, pw) = bb.toy.codec_factor, bb.toy.patch_size
        return (params.world.frames // pt) * (params.world.size // f // ph) * (params.world.size // f // pw)
    if bb.real is None or _transformer_config(params) is None:
        return None
    pt, ph, pw = transformer_patch(bb.family, bb.path)
    frames = (bb.real.frames - 1) // 4 + 1  # the VAEs: time ÷4 (4k+1 frames), space ÷8 (Wan 2.2, HV 1.5: ÷16)
    spatial = vae_spatial_compression(bb.family, bb.path)
    return (frames // pt) * (bb.real.height // spatial // ph) * (bb.real.width // spatial // pw)


def _transformer_config(params: Params) -> dict | None:
    """The real family's transformer config.json under ``backbone.path`` (None where there is none)."""
    return folder_transformer_config(params.backbone.path) or None


def head_count(params: Params) -> int | None:
    """Attention heads of the run's transformer, from the params or its config.json (None where unread)."""
    if params.backbone.family == "toy":
        return int(params.backbone.toy.num_attention_heads)
    cfg = _transformer_config(params)
    return int(cfg["num_attention_heads"]) if cfg and "num_attention_heads" in cfg else None


def check_world(params: Params, size: int | None = None) -> ParallelDims:
    """The checks of ``training.parallel`` and ``training.global_batch_size`` that need the world size: run
    at the start of a stage (and by ``dcm launch`` before it starts the ranks), before any model is loaded.
    Returns the job's degrees."""
    cfg = params.training.parallel
    size = world_size() if size is None else size
    dims = ParallelDims.from_config(cfg, size)
    if cfg.context_parallel > 1:
        tokens = token_count(params)
        if tokens is not None and tokens % cfg.context_parallel:
            raise ConfigError(f"{KEY}.context_parallel", cfg.context_parallel,
                              f"a divisor of the video token count ({tokens} tokens per sample at this size)")
        heads = head_count(params)
        if heads is not None and heads % cfg.context_parallel:  # Ulysses splits the heads over the group
            allowed = [d for d in range(1, heads + 1) if heads % d == 0 and size % d == 0
                       and (tokens is None or tokens % d == 0)]
            raise ConfigError(f"{KEY}.context_parallel", cfg.context_parallel,
                              f"a divisor of the attention head count ({heads} heads; allowed here "
                              f"{allowed})")
    # training.global_batch_size at this rank count: a grad_accum that is not a whole number fails here
    params.training.accumulation(dims.dp_size, world=size, cp=dims.cp)
    return dims


# ------------------------------------------------------------------------------------ wrapping


def is_wrapped(model: nn.Module) -> bool:
    from torch.distributed._composable.replicate import DDP
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, (FSDPModule, DDP))


def _policies(cfg: ParallelConfig) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    # bf16: blocks gather and compute in bf16, gradients are reduced in fp32 onto fp32 master shards
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.mixed_precision == "bf16" else MixedPrecisionPolicy())
    return {"mp_policy": mp,
            "offload_policy": (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload
                               else OffloadPolicy())}


@functools.lru_cache(maxsize=4)  # one set of process groups per job, however many models are wrapped
def shard_mesh(mesh):
    """The mesh FSDP2 shards over: every rank, as ``(dp_shard,)`` or ``(dp_replicate, dp_shard)``, the
    context-parallel ranks folded into the shard dimension (torchtitan's ``dp_shard_cp``): they hold one
    sample's token slices, so their gradients are averaged together with the data-parallel ranks'."""
    names = mesh.mesh_dim_names
    if "cp" not in names:
        return mesh
    sizes = dict(zip(names, mesh.shape, strict=True))
    shard = sizes["dp_shard"] * sizes["cp"]  # cp is the innermost dimension: the same rank order
    from torch.distributed.device_mesh import init_device_mesh

    if "dp_replicate" in names:
        return init_device_mesh(mesh.device_type, (sizes["dp_replicate"], shard),
                                mesh_dim_names=("dp_replicate", "dp_shard_cp"))
    return init_device_mesh(mesh.device_type, (shard,), mesh_dim_names=("dp_shard_cp",))


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh, *, shard: bool = True,
                root: bool = True) -> nn.Module:
    """``model`` wrapped in place for ``cfg.strategy`` over ``mesh`` (returned; nothing happens without a
    mesh).  fsdp/hsdp: ``fully_shard`` on each transformer block, then the root (``root=False``: blocks
    only, the root's own weights stay whole on every rank), with the mixed-precision and offload
    policies; ddp, or ``shard=False`` (small heads not worth sharding): ``replicate``.  A model without
    trainable parameters is left alone under replicate (every rank holds the same copy)."""
    if mesh is None or is_wrapped(model):
        return model
    if cfg.strategy == "ddp" or not shard:
        if not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.distributed._composable.replicate import replicate

        device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        # over every rank (data and context parallel alike); buffers are constants here (RoPE tables):
        # no broadcast, so passes may differ in count between ranks
        replicate(model, device_ids=device, forward_sync_buffers=False)
        # initialised now, not at the first forward: that may run frozen (a generator pass)
        replicate.state(model).lazy_init()
        return model
    from torch.distributed.fsdp import fully_shard

    dp_mesh, policies = shard_mesh(mesh), _policies(cfg)
    # a frozen model (EMA target, teacher) sees no backward, the only other place FSDP reshards: keeping its
    # gathered weights would also keep them stale once an EMA update changes the shards
    trains = any(p.requires_grad for p in model.parameters())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward or not trains,
                    **policies)
    if not root:
        return model
    # the root keeps its (small) gathered weights from forward to backward, if it has one
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=None if trains else True, **policies)
    if hasattr(model, "record_timestep"):  # a dual expert routes on the caller's timestep, before the cast
        model.register_forward_pre_hook(model.record_timestep, prepend=True, with_kwargs=True)
    return model


# ------------------------------------------------------------------------ the loop's other needs


def _is_dtensor(t: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """‖grad‖₂ over ``params``, sharded (DTensor: over every rank's shards) and plain gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    norms = ([torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []) + \
        ([torch.nn.utils.get_total_norm(plain)] if plain else [])
    if not norms:
        return torch.zeros(())
    return (norms[0] if len(norms) == 1
            else torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) and plain gradients alike: the total
    norm over every rank's shards, then one clip coefficient for all (torchtitan's way)."""
    if not any(p.grad is not None and _is_dtensor(p.grad) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = grad_norm(params)
    for group in ([p for p in params if p.grad is not None and _is_dtensor(p.grad)],
                  [p for p in params if p.grad is not None and not _is_dtensor(p.grad)]):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm


def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into ``target``, a plain tensor or this rank's shard of a DTensor."""
    with torch.no_grad():
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            # every rank holds ``full``: each slices its own shard
            local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(full)


def load_full_state_dict_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` for a full (one-process) state dict, ``model`` sharded or not: each
    rank copies its shard of every tensor in place."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        model.load_state_dict(state)
        return
    # the shards themselves (DTensors sharing the parameters' storage) and buffers
    targets = model.state_dict()
    if targets.keys() != state.keys():
        raise KeyError(f"state dict keys differ from the model's: missing "
                       f"{sorted(targets.keys() - state.keys())[:3]}, "
                       f"unexpected {sorted(state.keys() - targets.keys())[:3]}")
    for name, target in targets.items():
        copy_full_(target, state[name])


def reshard(model: nn.Module) -> None:
    """Every FSDP2 group of ``model`` back to its shards.  A root keeps its gathered weights after a forward
    until a backward reshards them, so after a no-grad forward (DMD2's backward simulation) ``model``'s
    parameters are, for the root's own, the gathered copies: reshard before naming its parameters (a
    checkpoint's state)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unshard_roots(models: list[nn.Module]) -> None:
    """Gather the root weights of the FSDP2 models in ``models``.  FSDP2 gathers a root's weights for backward
    from a hook on the root's output; a loss on an inner block's output (DMD2's classifier on a middle tap)
    leaves that hook out, so a further backward over a retained graph (the per-term gradient norms) finds
    the root's weights freed by the previous one.  Blocks gather their own."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        if isinstance(model, FSDPModule):
            model.unshard()


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank holds of ``t`` (its shard of a DTensor)."""
    return t.to_local().numel() if _is_dtensor(t) else t.numel()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank gets it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def gather_full_weights(model: nn.Module) -> None:
    """Make rank 0's ``model`` hold its full weights as plain parameters on the CPU, so the model's own
    save code (``save_pretrained``, PEFT's adapter save) writes one consolidated copy.  A collective
    (every rank calls it); afterwards the model is for saving only.  Nothing to do when unsharded."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    # every group sharded, so a state-dict hook leaves the swapped-in weights alone
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None and _is_dtensor(p):
                fqn = f"{module_name}.{name}" if module_name else name
                module._parameters[name] = nn.Parameter(full[fqn], requires_grad=p.requires_grad)
