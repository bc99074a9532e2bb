"""Sampling latency per method: median wall seconds per video, NFE, speedup over teacher-50.

Every method samples the same batch (same prompts, same noise) with its own (σ, expert) schedule
from ``dcm.methods.schedule_for`` through the one sampler (``dcm.sampling.sample``), decode
included as in the ``sample`` stage, in this one process on this hardware.  Repeats are interleaved
across methods (round-robin, after one warm-up call each) so that load drifts hit all of them alike.

Weights: run from a project folder; each method uses its trained weights when present there
(``models/teacher``, ``checkpoints/<m>/transformer``, ``checkpoints/<dcm>/{seme,dete}``) and otherwise
a random-init network of the same architecture — the cost of a forward does not depend on the weight
values.  A DCM without trained experts is SemE = a copy of the teacher plus a LoRA DetE built by
``make_dete`` (rank/alpha from params) with random adapter weights.  The ``dcm`` row samples as the
``sample`` stage does (``merge_experts``: each expert a plain transformer, LoRA merged);
``--routed`` adds the per-sample routing wrapper.  Each line says which weights it used.

A CFG teacher counts 2 NFE per step but runs them as one doubled-batch forward, which costs less
than two forwards on most hardware: the teacher's time per NFE is lower than a student's, and so X
below stays under 1 for every few-step student alike (compare the LCM line), switching or not.

Prints per method: median s/video, NFE, speedup = t(teacher-50) / t(method); for DCM-4 a line
``efficiency: X`` with X = speedup / (NFE_teacher / NFE_dcm): 1 means the expert switching costs
nothing beyond its forwards.  Also prints DCM vs the single-model student with the same NFE.

    python benchmarks/sampling.py [--params params.yaml] [--preset smoke] [--repeats 7] [--batch 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from dcm import config, paths
from dcm.backbones import create_teacher, load_teacher
from dcm.data.trajectories import initial_noise
from dcm.methods import guidance_forwards, schedule_for
from dcm.methods.dual_expert import dcm_experts
from dcm.sampling import nfe, sample, student_velocity, teacher_velocity


def teacher_backbone(params):
    if (paths.TEACHER / "backbone.json").is_file():
        return load_teacher(params, paths.TEACHER), "trained (models/teacher)"
    backbone = create_teacher(params)
    backbone.transformer.requires_grad_(False)
    return backbone, "random-init"


def experts_for(params, method: str, backbone, routed: bool | None = None):
    """(velocity functions per expert name, forwards per step per expert, which weights)."""
    m = params.method(method)
    if m.kind == "teacher":
        return ({"teacher": teacher_velocity(backbone, None)}, {"teacher": guidance_forwards(backbone)},
                "teacher")
    source = m.checkpoint_from or method
    if m.kind == "dcm":
        from dcm.distill.experts import make_dete

        merged = m.merge_experts if routed is None else not routed
        form = "merged per expert" if merged else "routed SemE+DetE wrapper"
        if (paths.checkpoint(source, "dete") / "expert.json").is_file():
            return (dcm_experts(params, method, backbone, merged=merged), {},
                    f"trained (checkpoints/{source}), {form}")
        dete = params.method(source).dete
        rank, alpha = (dete.lora_rank, dete.lora_alpha) if dete and dete.lora_rank > 0 else (16, 32.0)
        grid = params.teacher_grid()
        dual = make_dete(copy.deepcopy(backbone.transformer), backbone, rank, alpha,
                         kappa=params.grid.kappa, sigma_kappa=grid.sigma(params.grid.kappa))
        with torch.no_grad():  # a random adapter: DetE differs from SemE, as after training
            for name, p in dual.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        dual = dual.requires_grad_(False).eval()
        weights = f"random-init LoRA DetE r={rank} on the teacher's weights, {form}"
        if merged:
            return {e: student_velocity(backbone, dual.materialize(e).eval())
                    for e in ("seme", "dete")}, {}, weights
        velocity = student_velocity(backbone, dual)
        return {"seme": velocity, "dete": velocity}, {}, weights
    folder = paths.checkpoint(source) / "transformer"
    if folder.is_dir():
        model = type(backbone.transformer).from_pretrained(folder).eval().requires_grad_(False)
        weights = f"trained (checkpoints/{source})"
    else:
        model, weights = copy.deepcopy(backbone.transformer).eval(), "random-init (teacher copy)"
    return {"student": student_velocity(backbone, model)}, {}, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--methods", default="teacher,euler4,lcm,pcm,dcm", help="comma-separated; teacher first")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per method (median)")
    ap.add_argument("--batch", type=int, default=4, help="videos per sampler call")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--routed", action="store_true", help="also time DCM through the routed SemE+DetE "
                    "wrapper (one set of weights, adapter toggled per forward) beside the merged experts "
                    "`sample` uses")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = config.load(args.params, args.preset)
    methods = [m for m in args.methods.split(",") if m in params.methods]
    if not methods or methods[0] != "teacher":
        raise SystemExit("--methods must start with 'teacher' (speedups are relative to it)")

    backbone, teacher_weights = teacher_backbone(params)
    rows = [{"prompt": "a red striped square moves right quickly", "seed": 1000 + i}
            for i in range(args.batch)]
    latent_shape = backbone.latent_shape(params.world.frames, params.world.size)
    noise = torch.stack([initial_noise(r["seed"], latent_shape) for r in rows])
    cond = backbone.encode_prompts([r["prompt"] for r in rows])

    runs = {}
    for m in methods:
        experts, forwards, weights = experts_for(params, m, backbone)
        steps = schedule_for(params, m)
        runs[m] = {"experts": experts, "steps": steps, "nfe": nfe(steps, forwards), "times": [],
                   "weights": teacher_weights if weights == "teacher" else weights}

    def call(m: str) -> float:
        r = runs[m]
        t0 = time.perf_counter()
        with torch.no_grad():
            backbone.decode_latents(sample(r["experts"], r["steps"], noise, cond))
        return (time.perf_counter() - t0) / args.batch

    dcm = next((m for m in methods if params.method(m).kind == "dcm"), None)
    if dcm and args.routed:  # the same two experts through the per-sample routing wrapper
        experts, _, weights = experts_for(params, dcm, backbone, routed=True)
        runs[f"{dcm}-routed"] = {**runs[dcm], "times": [], "weights": weights, "experts": experts}
        methods.append(f"{dcm}-routed")
    for m in methods:  # warm-up: allocator, kernels, lazily built modules
        call(m)
    for _ in range(args.repeats):
        for m in methods:
            runs[m]["times"].append(call(m))

    grid = params.teacher_grid()
    print(f"sampling latency: {params.experiment} world "
          f"{params.world.frames}x{params.world.size}x{params.world.size}, grid N={grid.steps}, "
          f"kappa={params.grid.kappa}, batch {args.batch}, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, device cpu")
    t_teacher, nfe_teacher = statistics.median(runs["teacher"]["times"]), runs["teacher"]["nfe"]
    print(f"{'method':<10} {'steps':>5} {'NFE':>5} {'s/video':>10} {'speedup':>8}  weights")
    for m in methods:
        r = runs[m]
        med = statistics.median(r["times"])
        print(f"{m:<10} {len(r['steps']):>5} {r['nfe']:>5} {med:>10.4f} {t_teacher / med:>7.1f}x  "
              f"{r['weights']}")
    if dcm:
        t_dcm = statistics.median(runs[dcm]["times"])
        speedup, nfe_ratio = t_teacher / t_dcm, nfe_teacher / runs[dcm]["nfe"]
        print(f"{dcm}: speedup {speedup:.2f}x at NFE ratio {nfe_ratio:.2f} "
              f"({nfe_teacher} / {runs[dcm]['nfe']})")
        same_nfe = [m for m in methods if m != dcm and runs[m]["nfe"] == runs[dcm]["nfe"]
                    and (m not in params.methods or params.method(m).kind != "teacher")]
        for m in same_nfe:
            print(f"{dcm} vs {m} (same NFE): time ratio {statistics.median(runs[m]['times']) / t_dcm:.3f}")
        print(f"efficiency: {speedup / nfe_ratio:.3f}")


if __name__ == "__main__":
    main()
