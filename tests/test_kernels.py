"""The transformers' kernels (dcm.backbones.kernels) on the CPU: ``backbone.attention_backend`` through
diffusers' own backend selection, HunyuanVideo's text mask kept, context parallelism's processors on the same
kernel, and ``training.compile``'s regional torch.compile (inductor's CPU backend) computing what eager
computes, forward and a training step with activation checkpointing.  Real diffusers classes at tiny sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from dcm import config
from dcm.backbones import create_teacher
from dcm.backbones.base import PromptEmbeds, enable_activation_checkpointing, transformer_blocks
from dcm.backbones.kernels import compile_blocks, is_compiled, set_attention_backend
from dcm.config import ConfigError
from dcm.distill.loop import term_grad_norm
from helpers import REPO, family_raw, smoke_params

FAMILIES = ("wan", "hunyuan", "cogvideox")


@pytest.fixture(autouse=True)
def active_backend():
    """Each test leaves diffusers' process-wide active attention backend as it found it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def tiny(family: str) -> tuple[torch.nn.Module, dict]:
    """A random transformer of ``family`` at its CPU test size, and the inputs of one forward (HunyuanVideo's
    first prompt padded: its mask has zeros)."""
    import diffusers

    from dcm.backbones import cogvideox, hunyuan, wan

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([900.0, 300.0])
    if family == "wan":
        model = diffusers.WanTransformer3DModel(**wan.TRANSFORMER_CONFIGS["tiny"])
        return model, dict(hidden_states=torch.randn(2, 16, 3, 8, 8, generator=g), timestep=t,
                           encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    if family == "hunyuan":
        model = diffusers.HunyuanVideoTransformer3DModel(**hunyuan.TRANSFORMER_CONFIGS["tiny"])
        return model, dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=t,
                           encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                           encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
                           pooled_projections=torch.randn(2, 32, generator=g),
                           guidance=torch.tensor([6016.0, 6016.0]))
    model = diffusers.CogVideoXTransformer3DModel(**cogvideox.TRANSFORMER_CONFIGS["tiny"])
    return model, dict(hidden_states=torch.randn(2, 3, 4, 4, 4, generator=g), timestep=t,
                       encoder_hidden_states=torch.randn(2, 8, 32, generator=g))


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------------------ attention backends


@pytest.mark.parametrize("family", FAMILIES)
def test_the_native_backend_computes_what_diffusers_default_computes_bit_for_bit(family):
    model, inputs = tiny(family)
    before = forward(model, inputs)
    set_attention_backend(model, "native")
    assert torch.equal(forward(model, inputs), before)


def test_a_backend_set_at_load_reaches_every_dispatching_processor_and_runs_its_kernel(monkeypatch):
    """The toy teacher as ``create_teacher`` builds it for every stage: its self- and cross-attention run
    diffusers' ``_native_math`` kernel, which computes what ``native`` computes."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    native = create_teacher(config.parse(raw))
    raw["backbone"]["attention_backend"] = "_native_math"
    math = create_teacher(config.parse(raw))
    processors = [m.processor for m in math.transformer.modules() if hasattr(m, "processor")]
    assert len(processors) == 2 * len(math.transformer.blocks)  # attn1 and attn2 of every block
    assert all(p._attention_backend == "_native_math" for p in processors)

    calls = []
    kernel = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH,
                        lambda **kw: calls.append(1) or kernel(**kw))
    x = torch.randn(2, *math.latent_shape(8, 16))
    sigma, cond = torch.tensor([0.9, 0.3]), math.encode_prompts(["a red circle moves left"] * 2)
    with torch.no_grad():
        v_math = math.forward(math.transformer, x, sigma, cond)
        v_native = native.forward(native.transformer, x, sigma, cond)
    assert len(calls) == len(processors)
    torch.testing.assert_close(v_math, v_native, rtol=1e-5, atol=1e-6)


def test_hunyuans_text_mask_is_kept_by_a_mask_taking_kernel_and_refused_by_a_maskless_one():
    model, inputs = tiny("hunyuan")
    native = forward(model, inputs)
    padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    padded["encoder_hidden_states"][0, 4:] = 100.0  # what sits under the mask's zeros
    set_attention_backend(model, "_native_math")
    torch.testing.assert_close(forward(model, inputs), native, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forward(model, padded), native, rtol=1e-5, atol=1e-6)
    # the maskless kernels fail loudly in diffusers (never drop the mask); the params refuse them first
    set_attention_backend(model, "_native_flash")
    with pytest.raises(ValueError, match="attn_mask"):
        forward(model, inputs)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_context_parallel_processors_keep_the_backend_of_the_processors_they_replace(family):
    """Installed on a fake 2-rank group (no collectives run): every Ulysses processor dispatches to the
    kernel the setting chose."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dcm.parallel.context import _UlyssesProcessor, enable_context_parallel

    model, _ = tiny(family)
    set_attention_backend(model, "_native_math")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        cp = enable_context_parallel(model, family)
        ulysses = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None),
                                                                       _UlyssesProcessor)]
        assert ulysses and all(p._attention_backend == "_native_math" for p in ulysses)
        cp.remove()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family,key,value,allowed", [
    ("toy", "backbone.attention_backend", "flash_hub", "one of 'native', '_native_math'"),
    ("hunyuan", "backbone.attention_backend", "flash", "takes HunyuanVideo's text mask"),
    ("hunyuan", "backbone.attention_backend", "_native_flash", "'flash_varlen'"),
    ("hunyuan15", "backbone.attention_backend", "flash_varlen", "(B, 1, S, S) query-and-key mask"),
    ("cogvideox", "backbone.attention_backend", "_native_cudnn", "'native' for family 'cogvideox'"),
    ("toy", "training.compile", "yes", "true or false"),
])
def test_bad_kernel_settings_fail_when_the_params_are_read(family, key, value, allowed, tmp_path):
    raw = config.load_raw(REPO / "params.yaml", preset="smoke") if family == "toy" else family_raw(family,
                                                                                                   tmp_path)
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ConfigError) as err:
        config.parse(raw)
    assert (err.value.key, err.value.value) == (key, value) and allowed in err.value.allowed, str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a machine without a GPU")
@pytest.mark.parametrize("backend", ["_native_cudnn", "_native_efficient", "flash_varlen"])
def test_a_gpu_kernel_on_a_machine_without_one_fails_naming_what_runs_here(backend):
    model, _ = tiny("wan")
    with pytest.raises(ConfigError) as err:
        set_attention_backend(model, backend)
    assert err.value.key == "backbone.attention_backend" and err.value.value == backend
    assert "no CUDA GPU" in err.value.allowed and "'_native_math'" in err.value.allowed


# ------------------------------------------------------------------------------ regional compile


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def toy():
    """The toy teacher at the smoke size, frozen, and a batch for it."""
    params = smoke_params()
    backbone = create_teacher(params)
    backbone.transformer.eval().requires_grad_(False)
    x = torch.randn(4, *backbone.latent_shape(params.world.frames, params.world.size),
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = backbone.encode_prompts(["a red circle moves left", "a blue square moves up", "", "a star"])
    return backbone, x, torch.tensor([0.95, 0.7, 0.4, 0.1]), PromptEmbeds(cond.hidden)


@pytest.mark.slow  # inductor's first compile of a block: about a minute on 2 cores
def test_compiled_blocks_forward_like_eager_and_keep_names_hooks_and_copies(toy):
    """Every block compiled, one graph for all of them and for a copy's; the output and the features hooks
    take (registered after the first compiled call) within 1e-5 of eager; a deep copy computes with its own
    weights; the state dict keeps its names."""
    backbone, x, sigma, cond = toy
    model = backbone.transformer
    keys = list(model.state_dict())
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
        eager, eager_feats = backbone.predict(model, x, sigma, cond, features=True)
        eager_halved = backbone.forward(halved, x, sigma, cond)
    torch._dynamo.reset()
    graphs = compiled_graphs()
    assert compile_blocks(model) == len(transformer_blocks(model)) == len(model.blocks)
    with torch.no_grad():
        compiled = backbone.forward(model, x, sigma, cond)
        _, feats = backbone.predict(model, x, sigma, cond, features=True)
        twin = copy.deepcopy(model)  # an EMA target, DetE from SemE
        for p in twin.parameters():
            p.mul_(0.5)
        compiled_halved = backbone.forward(twin, x, sigma, cond)
    assert compiled_graphs() == graphs + 1
    assert all(is_compiled(b) for b in twin.blocks) and list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_halved, eager_halved, rtol=1e-5, atol=1e-6)
    for tap, eager_tap in zip(feats.taps, eager_feats.taps, strict=True):
        torch.testing.assert_close(tap, eager_tap, rtol=1e-5, atol=1e-6)


def training_step(backbone, student, x, sigma, cond) -> tuple[float, dict, dict]:
    """One SGD step of ``student`` with activation checkpointing on a velocity regression (and the features
    taken by hooks in the loss), a term's gradient norm taken first over the kept graph as on the loop's
    logging steps: the loss, the gradients and the updated weights.  SGD, whose update is linear in the
    gradient: Adam's first step, lr·g/|g|, would turn rounding in a gradient near 0 into a whole step."""
    student.train().requires_grad_(True)
    assert enable_activation_checkpointing(student) == 1
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    v, feats = backbone.predict(student, x, sigma, cond, features=True)
    loss = (v - target).pow(2).mean() + 1e-3 * sum(t.pow(2).mean() for t in feats.taps)
    assert term_grad_norm(loss, list(student.parameters())) > 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    optimizer.step()
    return loss.item(), grads, {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.slow  # inductor's first compile of a block: about a minute on 2 cores
def test_a_compiled_training_step_with_activation_checkpointing_matches_eager(toy):
    backbone, x, sigma, cond = toy
    eager = training_step(backbone, copy.deepcopy(backbone.transformer), x, sigma, cond)
    torch._dynamo.reset()
    graphs = compiled_graphs()
    student = copy.deepcopy(backbone.transformer)
    compile_blocks(student)
    compiled = training_step(backbone, student, x, sigma, cond)
    assert compiled_graphs() > graphs
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    for name, grad in eager[1].items():  # rounding relative to the tensor's largest gradient
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()),
                                   msg=name)
        torch.testing.assert_close(compiled[2][name], eager[2][name], rtol=1e-6, atol=1e-7, msg=name)
