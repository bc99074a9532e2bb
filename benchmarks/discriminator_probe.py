"""Can DetE's discriminator heads tell its endpoints from the consistency targets?  A probe per σ_adv.

Freezes a trained DetE (``checkpoints/<method>/seme`` + ``dete``), draws DetE training batches from
the online source (noised videos of data/prompts.json's train rows + one guided teacher step,
n ∈ [0, κ]), and collects the frozen teacher's features of real (x̂_tgt) and fake (x̂) exactly as
training does (``GanFeatureMatching.draw`` / ``adversarial_features``: σ_adv from {σ_min, σ_0, …,
σ_{κ−1}}, one ε′, the training autocast).  Fresh heads (official widths) then train alone with the
hinge loss (AdamW, betas (0, 0.999), clip 1.0) for --steps steps on the features of one half of the
rows; the other half is held out.  Printed per σ_adv bucket: the held-out accuracy (a sample is called
real when its mean logit over heads and tokens is > 0; accuracy = mean of the real and fake hit rates,
0.5 = chance), for the fresh heads and, when the run's resume state holds them, the run's own heads.

    python benchmarks/discriminator_probe.py [--method dcm] [--preset P] [--steps 200] [--batches 8]
                                             [--buckets 3] [--disc-lr 1e-4]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dcm import config, distill, paths
from dcm.backbones import load_teacher
from dcm.config import ConfigError
from dcm.distill import checkpoint, losses
from dcm.distill.discriminator import Discriminator, GanFeatureMatching, adversarial_sigmas
from dcm.distill.experts import load_dual_expert
from dcm.distill.loop import ConsistencyBatch, autocast_for, endpoints
from dcm.distill.optim import adamw
from dcm.schedule import SIGMA_MIN_INDEX


def collect(gan: GanFeatureMatching, backbone, dete, source, rows: torch.Tensor, batches: int,
            batch_size: int, kappa: int, generator: torch.Generator,
            autocast) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, tuple[int, int, int]]:
    """Real and fake teacher features (per tap, all samples) and each sample's σ_adv, as DetE's training makes
    them."""
    sigmas_ext = torch.as_tensor(source.grid_sigmas, dtype=torch.float32)  # position n + 1 ↔ grid index n
    device = next(dete.parameters()).device
    real, fake, sigma_adv = [], [], []
    for _ in range(batches):
        picked = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        n = torch.randint(0, kappa + 1, (batch_size,), generator=generator)
        end = torch.full_like(n, SIGMA_MIN_INDEX)
        data = source.batch(picked, n, generator)
        sigma_n, sigma_prev, sigma_end = (sigmas_ext[i + 1].to(device) for i in (n, n - 1, end))
        with torch.no_grad():
            x_pred, x_tgt = endpoints(backbone, dete, dete, data, sigma_n, sigma_prev, sigma_end,
                                      (n - 1 == end).to(device), autocast)
            batch = ConsistencyBatch(0, n, sigma_n, sigma_prev, sigma_end, data.x_n, data.x_prev, data.cond,
                                     x_pred, x_tgt, autocast)
            drawn = gan.draw(batch)
            feat_real, feat_fake = gan.adversarial_features(batch, drawn)
        real.append([t.float().cpu() for t in feat_real.taps])
        fake.append([t.float().cpu() for t in feat_fake.taps])
        sigma_adv.append(drawn[0].cpu())
    taps = len(real[0])
    return ([torch.cat([r[k] for r in real]) for k in range(taps)],
            [torch.cat([f[k] for f in fake]) for k in range(taps)],
            torch.cat(sigma_adv), feat_real.latent_thw)


def mean_logit(disc: Discriminator, feats: list[torch.Tensor], thw, device) -> torch.Tensor:
    """(N,) each sample's logit averaged over tokens and heads."""
    with torch.no_grad():
        logits = disc([f.to(device) for f in feats], thw)
    return torch.stack([lg.mean(1) for lg in logits]).mean(0).cpu()


def train_heads(disc: Discriminator, real, fake, thw, steps: int, lr: float, batch_size: int,
                generator: torch.Generator, device) -> float:
    """The D step of training, alone: hinge L_D on minibatches of (real, fake) pairs; the last loss."""
    optimizer = adamw(disc.parameters(), lr=lr, betas=(0.0, 0.999))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        pick = torch.randint(len(real[0]), (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = losses.discriminator_hinge(disc([f[pick].to(device) for f in real], thw),
                                          disc([f[pick].to(device) for f in fake], thw))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        optimizer.step()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="dcm", help="a trained dcm-kind method of params.methods")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--steps", type=int, default=200, help="head training steps")
    ap.add_argument("--batches", type=int, default=8, help="feature batches per half (train, held out)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: training.batch_size")
    ap.add_argument("--buckets", type=int, default=3, help="σ_adv buckets (consecutive grid levels)")
    ap.add_argument("--disc-lr", type=float, default=None, help="default: methods.<m>.dete.disc_lr")
    args = ap.parse_args()

    params = config.load(args.params, preset=args.preset)
    dete_cfg = params.method(args.method).dete
    if dete_cfg is None:
        raise ConfigError(f"--method {args.method}", args.method, "a dcm-kind method (one with a DetE)")
    source_method = params.method(args.method).checkpoint_from or args.method
    seme_dir, dete_dir = paths.checkpoint(source_method, "seme"), paths.checkpoint(source_method, "dete")
    if not (dete_dir / "expert.json").is_file():
        raise ConfigError(f"--method {args.method}", str(dete_dir), "a trained DetE: run its train_seme and "
                                                                  "train_dete stages first")
    torch.manual_seed(params.seed)
    device = distill.device()
    backbone = load_teacher(params, paths.TEACHER).to(device)
    dete = load_dual_expert(seme_dir, dete_dir, backbone)
    source = distill.make_source(params, backbone, source="online")
    grid, kappa = params.teacher_grid(), params.grid.kappa
    levels = adversarial_sigmas(grid, kappa)
    batch_size = args.batch_size or params.training.batch_size
    disc_lr = args.disc_lr or dete_cfg.disc_lr
    gan = GanFeatureMatching(backbone, backbone.transformer, levels, gan_weight=1.0, fm_weight=0.0,
                             disc_lr=disc_lr)
    autocast = autocast_for(device)
    generator = torch.Generator().manual_seed(params.seed)
    rows = torch.arange(len(source))
    if len(rows) < 2:
        raise ConfigError("data/prompts.json", len(rows), "at least 2 train rows (one half is held out)")
    train_rows, held_rows = rows[0::2], rows[1::2]
    print(f"discriminator probe [{args.method}]: DetE from {dete_dir}, {args.batches}×{batch_size} samples "
          f"per half, σ_adv levels {len(levels)} ({levels[0]:.4f} … {levels[-1]:.4f}), heads {args.steps} "
          f"steps at lr {disc_lr:g}")

    train_real, train_fake, _, thw = collect(gan, backbone, dete, source, train_rows, args.batches,
                                             batch_size, kappa, generator, autocast)
    held_real, held_fake, held_sigma, _ = collect(gan, backbone, dete, source, held_rows, args.batches,
                                                  batch_size, kappa, generator, autocast)
    final = train_heads(gan.discriminator, train_real, train_fake, thw, args.steps, disc_lr, batch_size,
                        generator, device)
    print(f"fresh heads: final hinge L_D {final:.4f} (2 = chance)")
    scored = {"fresh": gan.discriminator}
    state_file = checkpoint.state_path(dete_dir)  # the run's last resume state holds its own heads
    state = torch.load(state_file, map_location="cpu", weights_only=False) if state_file.is_file() else {}
    heads = (state.get("objectives") or {}).get("gan", {}).get("heads")
    if heads:
        trained = Discriminator(backbone.feature_dim(backbone.transformer), len(held_real),
                                backbone.token_patch(backbone.transformer)).to(device)
        trained.load_state_dict(heads)
        scored["trained"] = trained.eval()

    hits = {}
    for name, disc in scored.items():
        real_hit = mean_logit(disc, held_real, thw, device) > 0
        fake_hit = mean_logit(disc, held_fake, thw, device) < 0
        hits[name] = (real_hit, fake_hit)
    level_of = torch.as_tensor([int(np.argmin(np.abs(np.asarray(levels) - float(s)))) for s in held_sigma])
    buckets = [(int(b[0]), int(b[-1]))
               for b in np.array_split(np.arange(len(levels)), min(args.buckets, len(levels)))]
    rows_out = [(f"σ_adv {levels[lo]:.4f}-{levels[hi]:.4f}", lo, hi) for lo, hi in buckets]
    for label, lo, hi in [*rows_out, ("all σ_adv", 0, len(levels) - 1)]:
        mask = (level_of >= lo) & (level_of <= hi)
        count = int(mask.sum())
        figures = " | ".join(
            f"{name} {0.5 * (real[mask].float().mean() + fake[mask].float().mean()):.3f}" if count
            else f"{name} nan"
            for name, (real, fake) in hits.items())
        print(f"{label} | n {count} | {figures}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # bad input: one line naming the key, before any model is loaded
        raise SystemExit(f"discriminator_probe.py: {err}") from None
