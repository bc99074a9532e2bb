"""The kernels the transformers run on: the attention kernel diffusers dispatches to
(``backbone.attention_backend``) and regional ``torch.compile`` of the repeated blocks (``training.compile``).

Attention.  Wan's and HunyuanVideo's attention processors (and ``dcm.parallel.context``'s Ulysses
processors, which keep the backend of the processor they replace) call
``attention_dispatch.dispatch_attention_fn``, which runs the backend ``ModelMixin.set_attention_backend``
chose.  That call also makes it the process's active backend, the one every transformer loaded later in
the stage (a student from its checkpoint) dispatches to.  The values are diffusers' own backend names
(``dcm.config.ATTENTION_BACKENDS``):

    native              PyTorch's SDPA, which picks the kernel itself (flash, efficient, cuDNN or math)
    _native_math        SDPA's math kernel: the reference, slowest
    _native_flash       SDPA's flash kernel (GPU in bf16/fp16; the CPU has one too); no mask
    _native_efficient   SDPA's memory-efficient kernel (GPU)
    _native_cudnn       SDPA's cuDNN kernel (GPU, bf16/fp16)
    flash, _flash_3     the flash-attn 2 / flash-attn 3 packages' kernels (GPU, bf16/fp16); no mask
    flash_varlen, _flash_varlen_3   the same packages' kernels, the mask given as per-sample key lengths

HunyuanVideo masks its prompts' padding in every joint attention, and the mask keeps a prefix of the keys
(the video tokens, then the prompt's real ones): the mask-taking and the varlen kernels compute the same
attention; the maskless ones are refused for it when the params are read.  Its token refiner keeps
diffusers' ``AttnProcessor2_0`` (SDPA with its own square mask) whatever the setting.  HunyuanVideo 1.5's
processor builds a (B, 1, S, S) query-and-key mask: only SDPA's mask-taking kernels are allowed for it.
CogVideoX's processor calls SDPA itself, so ``native`` is its only value.  The Hub-downloaded kernels
(``*_hub``) are left out: stages never reach the network.

Compile.  Each repeated block (the units FSDP2 shards: ``transformer_blocks``) gets its class's
``forward`` through one ``torch.compile`` (inductor), bound to the block as its ``forward``.  The module's
hooks run outside the compiled code, so FSDP2's per-block gathers, diffusers' activation checkpointing
around the block's call, the discriminator's feature taps and context parallelism's token split work as
before, and a hook registered after the first call is never skipped (``nn.Module.compile`` would trace
the hooks, and dynamo does not guard on them).  A ``deepcopy`` (the EMA target, DetE from SemE) binds the
compiled forward to the copy; parameter names and state dicts are unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from dcm.backbones.base import transformer_blocks
from dcm.config import ATTENTION_BACKENDS, CUDA_ATTENTION, ConfigError

ATTENTION_KEY = "backbone.attention_backend"

# a block class's forward → its compiled form, shared by every block of the class (and every copy of one)
_COMPILED: dict[Callable, Callable] = {}


def diffusers_transformers(*models: nn.Module | None) -> list[nn.Module]:
    """The diffusers transformers inside ``models`` (through expert / PEFT / DDP / FSDP wrappers), each
    once: the ``ModelMixin`` classes of ``diffusers.models.transformers`` (not the VAEs)."""
    from diffusers import ModelMixin

    found: list[nn.Module] = []
    seen: set[int] = set()
    for model in models:
        for module in model.modules() if model is not None else ():
            if id(module) in seen or not isinstance(module, ModelMixin):
                continue
            if any(c.__module__.startswith("diffusers.models.transformers.") for c in type(module).__mro__):
                found.append(module)
                seen.update(id(m) for m in module.modules())
    return found


def set_attention_backend(model: nn.Module | None, backend: str) -> int:
    """``backend`` on every attention processor of the diffusers transformers inside ``model`` that
    dispatches through diffusers, and as the process's active backend; returns how many processors took
    it.  A ``ConfigError`` (key, value, what is allowed) for a GPU kernel on a machine without one, a
    kernel whose package is not installed, or a transformer none of whose processors dispatches."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(ATTENTION_KEY, backend, f"one of {list(ATTENTION_BACKENDS)}")
    if backend in CUDA_ATTENTION and not torch.cuda.is_available():
        on_cpu = [b for b in ATTENTION_BACKENDS if b not in CUDA_ATTENTION]
        raise ConfigError(ATTENTION_KEY, backend,
                          f"a kernel this machine runs: it has no CUDA GPU, and the CPU runs {on_cpu}")
    from diffusers.utils import logging as diffusers_logging

    taken = 0
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "experimental API" notice: once per model, every stage
    try:
        for transformer in diffusers_transformers(model):
            try:
                transformer.set_attention_backend(backend)
            except RuntimeError as err:  # diffusers' check that the backend's package is installed
                raise ConfigError(ATTENTION_KEY, backend,
                                  f"a backend whose kernels are installed ({err})") from None
            took = sum(getattr(getattr(m, "processor", None), "_attention_backend", None) == backend
                       for m in transformer.modules())
            if not took and backend != "native":
                raise ConfigError(ATTENTION_KEY, backend,
                                  f"'native' for {type(transformer).__name__}: none of its attention "
                                  "processors dispatches through diffusers' backends (they call SDPA)")
            taken += took
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return taken


def compile_blocks(*models: nn.Module | None) -> int:
    """Regional compilation: every repeated block of the diffusers transformers inside ``models`` runs its
    class's ``forward`` compiled by ``torch.compile`` (module docstring); a block already compiled stays
    as it is.  Returns how many blocks run compiled."""
    # a compiled backward that reuses its saved buffers refuses a second backward over the same graph, and
    # the loop's per-term gradient norms take one (retain_graph)
    torch._functorch.config.donated_buffer = False
    count = 0
    for transformer in diffusers_transformers(*models):
        for block in transformer_blocks(transformer):
            forward = type(block).forward
            if forward not in _COMPILED:
                _COMPILED[forward] = torch.compile(forward)
            if not is_compiled(block):
                block.forward = types.MethodType(_COMPILED[forward], block)
            count += 1
    return count


def is_compiled(block: nn.Module) -> bool:
    """Whether ``block`` runs a forward ``compile_blocks`` compiled (bound to the block itself)."""
    bound = block.__dict__.get("forward")
    return (isinstance(bound, types.MethodType) and bound.__self__ is block
            and any(bound.__func__ is f for f in _COMPILED.values()))
