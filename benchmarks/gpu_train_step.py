"""SemE, DetE and DMD2 training-step time, peak memory and model FLOP utilisation on a real-size random
transformer.

One step is what ``dcm.distill.loop.train`` does per micro-batch, with the engine's own pieces:
student forward with grad (bf16 autocast over fp32 master weights), target forward without grad,
pseudo-Huber endpoint loss, backward, clip 1.0, AdamW (wd 1e-3); SemE adds the temporal coherence
loss and trains every parameter; DetE is ``make_dete`` (LoRA r = 128, α = 256 + copied timestep
layers, backbone frozen) with ``GanFeatureMatching`` (frozen-teacher features of real and fake,
discriminator heads, their own AdamW step).  DMD2 (``dcm.distill.dmd2``) is the loop's micro-batch for a
dmd2 row at one generator step: ``BackwardSimulation`` makes the generator's input by running the current
generator's earlier steps of the 4-step uniform schedule without grad, the loop's ``endpoints`` (the
generator's forward with grad to σ_min, i.e. its x0, and the loop's no-grad target forward, whose
consistency term is exactly 0 for DMD2), ``DistributionMatching.generator_loss`` (dm term; the GAN
classifier only with ``--dmd2-gan``, on random "real" latents), backward, clip 1.0, AdamW of the generator,
then ``after_generator_step``: the fake score's ``fake_steps`` updates (default ``Dmd2Config``'s).  It is
measured at the LAST generator step, so each step's backward simulation runs the generator's three earlier
steps.  Activation checkpointing is on (diffusers' ``enable_gradient_checkpointing`` on the student and the
frozen teacher, as ``training.gradient_checkpointing``; for DMD2 on the generator and the fake score)
unless ``--no-checkpointing``.

One GPU, no FSDP: a 13B full-parameter SemE (fp32 weights + AdamW states ≈ 16 bytes/parameter) does
not fit, so ``--depth-scale`` (default: automatic for HunyuanVideo, halving until a step fits) builds
fewer blocks; the printed block counts say which depth was measured.  DMD2 trains two copies (generator and
fake score): with the automatic depth it searches its own, starting from the one SemE/DetE fitted, and a
second ``model (dmd2):`` line gives it where it differs.

Model FLOPs: F = one forward (``gpu_common.forward_flops``); SemE step = student fwd + bwd (3F) +
target fwd (F) = 4F; DetE step adds the teacher's feature forwards for real (F) and fake (fwd + bwd,
3F) = 8F (the LoRA and discriminator heads are ignored).  DMD2 step, counted rather than written down:
forward hooks on the generator, the teacher and the fake score tally every call of each top-level
transformer in each measured step, F per sample row (the teacher's CFG pass is one call on 2 rows), plus 2F
per row for its backward when the network has trainable parameters and its output carries grad, 1F when only
the output carries grad (the generator's GAN term through the frozen fake score: input gradients only).  At
generator step k = 4 of K = 4 with CFG that is: backward simulation 3F + generator fwd/bwd 3F + loop target
fwd 1F + real score 2F (1F with HunyuanVideo's embedded guidance) + fake score fwd F + per fake update 3F
(fwd/bwd) + for each update after the first a fresh generator sample, (k_i + 1)F with k_i uniform over
0…K−1: 25F + Σ(k_i + 1) for fake_steps 5, so it varies from step to step (printed: the mean over the measured
steps, and FLOP/s = the median over the runs of that run's FLOPs / its time).  With ``--dmd2-gan`` each
classifier pass is counted as a whole forward and backward, though its gradient starts at the fake score's
middle tap (an overcount of that partial backward).  Activation-checkpointing recomputation is not counted.
MFU = model FLOPs / step time / peak bf16.

    python benchmarks/gpu_train_step.py --family wan                 # Wan 2.1 1.3B, 480×832, 81 frames
    python benchmarks/gpu_train_step.py --family hunyuan             # HunyuanVideo, largest fitting depth
    python benchmarks/gpu_train_step.py --family wan --tiny          # CPU smoke run
    python benchmarks/gpu_train_step.py --family wan --experts dmd2  # DMD2 only
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as common  # noqa: E402

from dcm import schedule  # noqa: E402
from dcm.backbones.base import enable_activation_checkpointing  # noqa: E402
from dcm.config import Dmd2Config, preset_overlay  # noqa: E402
from dcm.distill import dmd2, losses  # noqa: E402
from dcm.distill.discriminator import GanFeatureMatching, adversarial_sigmas  # noqa: E402
from dcm.distill.experts import make_dete  # noqa: E402
from dcm.distill.loop import ADAM_BETAS, ConsistencyBatch, autocast_for, endpoints  # noqa: E402
from dcm.distill.optim import adamw  # noqa: E402

FM_WEIGHT = {"wan": 10.0, "hunyuan": 1.0, "cogvideox": 1.0}
EXPERTS = ("seme", "dete", "dmd2")
DMD2_STEPS = 4  # the generator's sampling schedule: uniform_schedule(grid, 4, "student")
LR, WEIGHT_DECAY, MAX_GRAD_NORM, HUBER_C = 1e-6, 1e-3, 1.0, 1e-3


def make_step(expert: str, backbone, student, teacher, trainable, x_n, x_prev, cond, grid, kappa, device, fm):
    """A closure running one SemE or DetE optimisation step."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    optimizer = adamw(trainable, lr=1e-6, weight_decay=1e-3)
    if expert == "seme":
        n, end = torch.tensor([kappa + 1]), kappa
    else:
        n, end = torch.tensor([kappa]), -1
    sigma_n = torch.tensor([grid.sigma(int(n))], device=device)
    sigma_prev = torch.tensor([grid.sigma(int(n) - 1)], device=device)
    sigma_end = torch.tensor([grid.sigma(end) if end >= 0 else grid.sigma_min], device=device)
    gan = None
    if expert == "dete":
        gan = GanFeatureMatching(backbone, teacher, adversarial_sigmas(grid, kappa), gan_weight=1.0,
                                 fm_weight=fm, disc_lr=1e-5, weight_decay=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            v = backbone.predict(student, x_n, sigma_n, cond)
        x_end = losses.euler_endpoint(x_n, v.float(), sigma_n, sigma_end)
        with torch.no_grad(), autocast:
            v_prev = backbone.predict(student, x_prev, sigma_prev, cond)
        target = losses.consistency_target(x_prev, v_prev.float(), sigma_prev, sigma_end,
                                           torch.zeros(1, dtype=torch.bool, device=device))
        loss = losses.pseudo_huber(x_end, target, 1e-3)
        batch = ConsistencyBatch(0, n, sigma_n, sigma_prev, sigma_end, x_n, x_prev, cond, x_end, target)
        if expert == "seme":
            loss = loss + losses.temporal_coherence(x_end, target, 3)
        else:
            with autocast:
                loss = loss + sum(gan.generator_loss(batch).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if gan is not None:
            with autocast:
                gan.after_generator_step(batch)

    return step


class RandomVideos:
    """The GAN classifier's "real" videos (what ``OnlineSource`` gives it: latents x0 and their prompts'
    embeddings), random: the cost does not depend on their content."""

    def __init__(self, x0: torch.Tensor, embeds):
        self.x0, self.embeds = x0, embeds

    def __len__(self) -> int:
        return len(self.x0)


class ForwardTally:
    """Calls of named top-level transformers, in units of F (one forward of one sample row): ``forward``
    rows, and ``backward`` 2 per row when the network has trainable parameters and its output carries
    grad, 1 per row when only its output carries grad (input gradients through a frozen network)."""

    def __init__(self, nets: dict[str, nn.Module]):
        self.names = list(nets)
        self.counts = {name: {"forward": 0.0, "backward": 0.0} for name in self.names}
        self.handles = [net.register_forward_hook(self._hook(name), with_kwargs=True)
                        for name, net in nets.items()]

    def _hook(self, name: str):
        def record(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rows = x.shape[0]
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.counts[name]["forward"] += rows
            if out.requires_grad:
                trained = any(p.requires_grad for p in module.parameters())
                self.counts[name]["backward"] += (2 if trained else 1) * rows
        return record

    def take(self) -> dict[str, dict[str, float]]:
        """The counts since the last ``take``, and a fresh start."""
        counts = self.counts
        self.counts = {name: {"forward": 0.0, "backward": 0.0} for name in self.names}
        return counts

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_dmd2(args, backbone, grid, latent, device) -> tuple:
    """(generator, source, objective, n) for one DMD2 micro-batch at the last generator step n."""
    cfg = Dmd2Config()
    overlay = preset_overlay(args.family)["grid"]
    T = overlay.get("num_train_timesteps", 1000)
    if backbone.guidance_mode == "cfg":  # the real score's unconditional prompt, without a text encoder
        backbone.prompt_table[backbone.settings.negative_prompt] = common.random_cond(backbone, 1, "cpu",
                                                                                      torch.float32)
    generator = copy.deepcopy(backbone.transformer).requires_grad_(True)
    # the generator's own grid and steps, as dmd2.build takes them (DMD2's timesteps on the unshifted scale)
    grid = dmd2.generator_grid(T, overlay["shift"])
    steps = dmd2.generator_schedule(T, overlay["shift"], DMD2_STEPS)
    source = dmd2.BackwardSimulation(backbone, generator,
                                     common.random_cond(backbone, 1, "cpu", torch.float32),
                                     grid, steps, latent, device)
    videos = None
    if args.dmd2_gan:
        videos = RandomVideos(torch.randn(1, *latent, device=device),
                              common.random_cond(backbone, 1, device, torch.float32))
    train_sigmas = torch.from_numpy(schedule.training_sigmas(T, overlay["shift"]))
    objective = dmd2.DistributionMatching(
        backbone, source, train_sigmas, fake_steps=args.dmd2_fake_steps, fake_lr=LR, dm_weight=cfg.dm_weight,
        dm_sigma_range=(cfg.t_min, cfg.t_max), guidance=cfg.guidance,
        gan_weight=cfg.gan_weight if args.dmd2_gan else 0.0,
        cls_weight=cfg.cls_weight if args.dmd2_gan else 0.0, real_videos=videos, weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, seed=0)
    # as the loop (student, the objective's grad networks) and dmd2.build (the fake score)
    if args.checkpointing:
        enable_activation_checkpointing(generator, objective.fake)
    return generator, source, objective, torch.tensor([source.indices[-1]])


def make_dmd2_step(backbone, generator, source, objective, n, device):
    """A closure running the loop's micro-batch and optimiser step for a dmd2 row at grid index n."""
    autocast = autocast_for(device)
    trainable = list(generator.parameters())
    optimizer = adamw(trainable, lr=LR, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    space = dmd2.NoConsistencyLoss()
    sampler = torch.Generator().manual_seed(0)
    rows = torch.zeros(len(n), dtype=torch.long)
    end = torch.full_like(n, schedule.SIGMA_MIN_INDEX)
    sigma_n, sigma_prev, sigma_end = source.sigma(n), source.sigma(n - 1), source.sigma(end)
    at_boundary = (n - 1 == end).to(device)
    calls = iter(range(2**62))

    def step():
        index = next(calls)
        optimizer.zero_grad(set_to_none=True)
        data = source.batch(rows, n, sampler)  # backward simulation: the generator's steps before n, no grad
        x_end_pred, x_end_target = endpoints(backbone, generator, generator, data, sigma_n, sigma_prev,
                                             sigma_end, at_boundary, autocast)
        batch = ConsistencyBatch(index, n, sigma_n, sigma_prev, sigma_end, data.x_n, data.x_prev, data.cond,
                                 x_end_pred, x_end_target, autocast)
        with torch.no_grad():
            m_target = space.target(x_end_target)
        loss = losses.pseudo_huber(space.student(x_end_pred), m_target, HUBER_C)  # exactly 0, as in the loop
        loss = loss + sum(objective.generator_loss(batch).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        objective.after_generator_step(batch)

    return step


def measure_dmd2(args, backbone, grid, latent, device, flops) -> dict:
    generator, source, objective, n = make_dmd2(args, backbone, grid, latent, device)
    generator.train()
    step = make_dmd2_step(backbone, generator, source, objective, n, device)
    tally = ForwardTally({"generator": generator, "teacher": backbone.transformer,
                          "fake score": objective.fake})
    counted = []

    def counted_step():
        step()
        counted.append(tally.take())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = common.median_seconds(counted_step, args.repeats, args.warmup, device)
    finally:
        tally.remove()
    counted = counted[len(counted) - len(times):]  # the measured steps
    units = [sum(c["forward"] + c["backward"] for c in run.values()) for run in counted]
    mean = {name: {k: sum(run[name][k] for run in counted) / len(counted) for k in ("forward", "backward")}
            for name in tally.names}
    return {"times": times, "model_flops_runs": [u * flops for u in units],
            "units_mean": sum(units) / len(units),
            "units_by_net": mean, "trainable": sum(p.numel() for p in (*generator.parameters(),
                                                                       *objective.fake_parameters())),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "step": len(source.indices), "of": len(source.indices), "fake_steps": objective.fake_steps,
            "gan": objective.classifier is not None}


def measure(args, depth_scale: float, experts: tuple[str, ...]) -> dict:
    device, _ = common.device_and_dtype(args.tiny)
    frames, height, width = common.video_size(args)
    backbone, cfg = common.build_backbone(args.family, args.tiny, frames, height, width, depth_scale)
    backbone.transformer.to(device).eval().requires_grad_(False)  # fp32 master weights, frozen teacher
    backbone.to(device)
    latent = backbone.latent_shape_hw(frames, height, width)
    grid, kappa = common.preset_grid(args.family)
    x_n = torch.randn(1, *latent, device=device)
    x_prev = x_n + 0.01 * torch.randn_like(x_n)
    cond = common.random_cond(backbone, 1, device, torch.float32)
    tokens = common.video_tokens(backbone, latent)
    flops = common.forward_flops(backbone.transformer, tokens, common.text_tokens(backbone),
                                 common.count_blocks(backbone))
    out = {"cfg": cfg, "latent": latent, "tokens": tokens, "frames": frames, "height": height, "width": width,
           "params": sum(p.numel() for p in backbone.transformer.parameters()), "forward_flops": flops}

    for expert in (e for e in experts if e != "dmd2"):
        seme = copy.deepcopy(backbone.transformer).requires_grad_(True)
        if expert == "seme":
            student, trainable = seme, list(seme.parameters())
        else:
            student = make_dete(seme, backbone, 4 if args.tiny else 128, 8 if args.tiny else 256, kappa=kappa,
                                sigma_kappa=grid.sigma(kappa)).to(device)
            trainable = student.trainable_parameters()
        if args.checkpointing:  # as training.gradient_checkpointing: the student and the GAN teacher pass
            enable_activation_checkpointing(student, backbone.transformer)
        student.train()
        step = make_step(expert, backbone, student, backbone.transformer, trainable, x_n, x_prev, cond, grid,
                         kappa, device, FM_WEIGHT[args.family])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = common.median_seconds(step, args.repeats, args.warmup, device)
        out[expert] = {"times": times, "trainable": sum(p.numel() for p in trainable),
                       "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                    if device.type == "cuda" else None),
                       "model_flops": (4 if expert == "seme" else 8) * flops}
        del student, trainable, step, seme
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "dmd2" in experts:
        out["dmd2"] = measure_dmd2(args, backbone, grid, latent, device, flops)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def parse_experts(text: str) -> tuple[str, ...]:
    """The comma list of ``--experts``, in the order measured (seme, dete, dmd2)."""
    wanted = {e.strip() for e in text.split(",") if e.strip()}
    unknown = wanted - set(EXPERTS)
    if unknown or not wanted:
        raise ValueError(f"--experts: a comma list of {', '.join(EXPERTS)}; got {text!r}")
    return tuple(e for e in EXPERTS if e in wanted)


def tflops_text(value: float) -> str:
    """TFLOP/s with two decimals, or three significant digits where two decimals would print 0.00 (tiny
    runs)."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.3g}"


def main() -> None:
    ap = common.base_parser(__doc__, repeats=5, warmup=2)
    ap.add_argument("--experts", default=",".join(EXPERTS),
                    help=f"comma list of the steps to measure, of {', '.join(EXPERTS)} (default: all)")
    ap.add_argument("--depth-scale", type=float, default=None,
                    help="fraction of the blocks (default 1; HunyuanVideo on one GPU: halve until it fits)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 peak for MFU (default: from the GPU name)")
    ap.add_argument("--dmd2-fake-steps", type=int, default=Dmd2Config().fake_steps,
                    help="DMD2's fake-score updates per generator step (default: Dmd2Config's, %(default)s)")
    ap.add_argument("--dmd2-gan", action="store_true",
                    help="DMD2 with its GAN classifier (Dmd2Config's gan / cls weights) on random "
                    "real latents")
    args = ap.parse_args()
    try:
        experts = parse_experts(args.experts)
    except ValueError as err:
        ap.error(str(err))
    torch.manual_seed(0)
    device, _ = common.device_and_dtype(args.tiny)

    scale = args.depth_scale or 1.0
    auto = args.depth_scale is None and args.family == "hunyuan" and not args.tiny
    # with the automatic depth DMD2 (two trained copies) searches its own, from where SemE/DetE fitted
    groups = [g for g in ([e for e in experts if e != "dmd2"], [e for e in experts if e == "dmd2"]) if g] \
        if auto else [list(experts)]
    measured = []
    for group in groups:
        while True:
            try:
                measured.append((measure(args, scale, tuple(group)), scale))
                break
            except torch.OutOfMemoryError:
                if not auto or scale < 0.05:
                    raise
                print(f"out of memory at depth scale {scale}; halving")
                torch.cuda.empty_cache()
                scale /= 2

    peak = common.peak_tflops(device, args.peak_tflops)
    print(f"device: {common.describe_device(device)}; fp32 master weights, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, activation checkpointing "
          f"{args.checkpointing}")
    printed_scale = None
    for result, scale in measured:
        if scale != printed_scale:
            label = "" if printed_scale is None else f" ({', '.join(e for e in experts if e in result)})"
            printed_scale = scale
            depth = ", ".join(f"{k}={result['cfg'][k]}" for k in common.DEPTH_KEYS[args.family])
            print(f"model{label}: {args.family} {'tiny' if args.tiny else common.SIZES[args.family]} "
                  f"random init at depth {depth} "
                  f"(scale {scale:g}{', the largest that fit' if auto and scale < 1 else ''}), "
                  f"{result['params'] / 1e6:.1f} M parameters")
            print(f"video: {result['frames']} frames {result['height']}×{result['width']} → latent "
                  f"{tuple(result['latent'])}, {result['tokens']} video tokens, batch 1; "
                  f"forward = {result['forward_flops'] / 1e9:.4g} GFLOP")
        for expert in (e for e in ("seme", "dete") if e in result):
            r = result[expert]
            t = common.median(r["times"])
            mfu = f", MFU {100 * r['model_flops'] / t / (peak * 1e12):.1f}% of {peak:g} TFLOP/s" \
                if peak else ""
            mem = f", peak memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
            print(f"{expert}: median step {t:.3f} s (runs {', '.join(f'{x:.3f}' for x in r['times'])}), "
                  f"{r['trainable'] / 1e6:.2f} M trainable{mem}, "
                  f"{r['model_flops'] / t / 1e12:.2f} TFLOP/s{mfu}")
        if "dmd2" in result:
            print_dmd2(result["dmd2"], peak)


def print_dmd2(r: dict, peak: float | None) -> None:
    t = common.median(r["times"])
    rate = common.median([f / s for f, s in zip(r["model_flops_runs"], r["times"])])  # FLOPs vary per step
    mfu = f", MFU {100 * rate / (peak * 1e12):.1f}% of {peak:g} TFLOP/s" if peak else ""
    mem = f", peak memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
    nets = "generator + fake score" + (" + classifier head" if r["gan"] else "")
    print(f"dmd2: median step {t:.3f} s (runs {', '.join(f'{x:.3f}' for x in r['times'])}), "
          f"{r['trainable'] / 1e6:.2f} M trainable ({nets}){mem}, {tflops_text(rate / 1e12)} TFLOP/s{mfu}; "
          f"at generator step {r['step']} of {r['of']} (its input backward-simulated through the generator's "
          f"steps 1–{r['step'] - 1}), {r['fake_steps']} fake-score updates, GAN classifier "
          f"{'on' if r['gan'] else 'off'}")
    parts = ", ".join(f"{name} {c['forward']:g} fwd + {c['backward']:g} bwd"
                      for name, c in r["units_by_net"].items())
    print(f"  dmd2 model FLOPs per step (counted; mean over {len(r['times'])} measured step"
          f"{'s' if len(r['times']) != 1 else ''}): {r['units_mean']:g}F = {parts}")


if __name__ == "__main__":
    main()
