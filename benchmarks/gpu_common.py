"""What the GPU benchmarks share: random-initialised real-size transformers behind the real adapters,
random text conditioning, timing with CUDA synchronisation, model-FLOP accounting.

The transformers are the real diffusers classes at the released configurations
(``dcm.backbones.<family>.TRANSFORMER_CONFIGS``); weights are random, which does not change the cost.
No pipeline folder, text encoder or VAE is loaded: conditioning is random tensors of the real shapes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from dcm.backbones import adapter_class
from dcm.backbones.base import PromptEmbeds, unwrap
from dcm.config import RealBackboneConfig

SIZES = {"wan": "1.3B", "hunyuan": "13B", "cogvideox": "2B"}
# frames, height, width
VIDEO = {"wan": (81, 480, 832), "hunyuan": (61, 544, 960), "cogvideox": (49, 480, 720)}
TINY_VIDEO = (9, 32, 32)
DEPTH_KEYS = {"wan": ("num_layers",), "hunyuan": ("num_layers", "num_single_layers"),
              "cogvideox": ("num_layers",)}
# dense bf16 tensor-core peaks (TFLOP/s) for model FLOP utilisation
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def device_and_dtype(tiny: bool) -> tuple[torch.device, torch.dtype]:
    if tiny or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def transformer_config(family: str, tiny: bool, depth_scale: float = 1.0) -> dict:
    module = __import__(f"dcm.backbones.{family}", fromlist=["TRANSFORMER_CONFIGS"])
    cfg = dict(module.TRANSFORMER_CONFIGS["tiny" if tiny else SIZES[family]])
    for key in DEPTH_KEYS[family]:
        cfg[key] = max(1, round(cfg[key] * depth_scale))
    return cfg


def build_backbone(family: str, tiny: bool, frames: int, height: int, width: int, depth_scale: float = 1.0,
                   guidance_scale: float = 6.0):
    """The family's adapter around a random transformer (no VAE, no text encoders)."""
    import diffusers

    cls = adapter_class(family)
    model_class = {"wan": "WanTransformer3DModel", "hunyuan": "HunyuanVideoTransformer3DModel",
                   "cogvideox": "CogVideoXTransformer3DModel"}[family]
    cfg = transformer_config(family, tiny, depth_scale)
    if family == "cogvideox":  # its positional tables assume the sample size: make it the benchmark's
        cfg.update(sample_height=height // 8, sample_width=width // 8, sample_frames=frames)
    transformer = getattr(diffusers, model_class)(**cfg)
    pipe = _bare_pipeline(family, transformer)
    settings = RealBackboneConfig(height=height, width=width, frames=frames)
    backbone = cls(pipe, settings, guidance_scale)
    return backbone, cfg


def _bare_pipeline(family: str, transformer):
    """The pipeline object around a transformer only (the adapters call its helpers, not its encoders)."""
    import diffusers

    if family == "cogvideox":
        scheduler = diffusers.CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, prediction_type="v_prediction",
                                                     rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                                     snr_shift_scale=3.0)
        return diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                           transformer=transformer)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=17.0)
    if family == "wan":
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                     transformer=transformer)
    return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                          vae=None, scheduler=scheduler, text_encoder_2=None,
                                          tokenizer_2=None)


def text_tokens(backbone) -> int:
    cfg = backbone.transformer.config
    if backbone.family == "cogvideox":
        return int(cfg.max_text_seq_length)
    return 512 if backbone.family == "wan" else 256


def random_cond(backbone, batch: int, device, dtype) -> PromptEmbeds:
    cfg = backbone.transformer.config
    length = text_tokens(backbone)
    dim = cfg.text_dim if backbone.family == "wan" else cfg.text_embed_dim
    hidden = torch.randn(batch, length, dim, device=device, dtype=dtype)
    if backbone.family != "hunyuan":
        return PromptEmbeds(hidden)
    return PromptEmbeds(hidden, {"attention_mask": torch.ones(batch, length, device=device, dtype=torch.long),
                                 "pooled": torch.randn(batch, cfg.pooled_projection_dim, device=device,
                                                       dtype=dtype)})


def video_tokens(backbone, latent_shape) -> int:
    t, h, w = (d // p for d, p in zip(latent_shape[1:], backbone.token_patch(backbone.transformer)))
    return t * h * w


def forward_flops(model: torch.nn.Module, tokens: int, text: int, blocks: int) -> float:
    """Model FLOPs of one forward: 2·(matmul parameters)·(tokens the linears see) + 4·blocks·L²·d attention.

    Every linear is counted over video + text tokens (an upper bound for Wan, whose text tokens only
    enter the cross-attention K/V); attention over the joint sequence L = tokens + text.
    """
    base = unwrap(model)
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    inner = base.config.num_attention_heads * base.config.attention_head_dim
    seq = tokens + text
    return 2.0 * linear * seq + 4.0 * blocks * seq * seq * inner


def count_blocks(backbone) -> int:
    base = backbone.transformer
    return sum(len(getattr(base, n)) for n in ("blocks", "transformer_blocks", "single_transformer_blocks")
               if hasattr(base, n))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def base_parser(doc: str, repeats: int, warmup: int):
    """The options both GPU benchmarks take: family, --tiny, video size, repeats and warm-up."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=list(SIZES), default="wan")
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (checks the script runs)")
    ap.add_argument("--frames", type=int), ap.add_argument("--height", type=int), \
        ap.add_argument("--width", type=int)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--warmup", type=int, default=warmup)
    return ap


def video_size(args) -> tuple[int, int, int]:
    """(frames, height, width): the family's stated size (or the tiny one), each overridable."""
    frames, height, width = TINY_VIDEO if args.tiny else VIDEO[args.family]
    return args.frames or frames, args.height or height, args.width or width


def preset_grid(family: str):
    """The teacher grid and κ of the family's preset (src/dcm/presets/<family>.yaml)."""
    from dcm.config import preset_overlay
    from dcm.schedule import teacher_grid

    grid = preset_overlay(family)["grid"]
    return teacher_grid(grid["steps"], grid["shift"], grid.get("num_train_timesteps", 1000)), grid["kappa"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
