"""benchmarks/memory_plan.py: its predictions against measured bytes on CPU, its table for every family,
and its errors for bad combinations.

Measured: two real gloo processes under torchrun (FSDP2 ``fully_shard`` on every block and the root over
both ranks, fp32, as the plan assumes) run two training steps and measure the second, the steady state
(AdamW's moments exist; the gradients were set to None, as the loop does at each step's start): SemE
(full fine-tune, AdamW, the frozen teacher held replicated) and DetE (LoRA + copied timestep layers over a
frozen SemE, the teacher's feature pass with grad) of the toy teacher and the tiny Wan / HunyuanVideo /
CogVideoX transformers, with and without activation checkpointing, and Wan also with context parallel 2.  Two figures per step:
- persistent: the bytes of the local shards of the parameters, gradients and AdamW states after the
  step (and DetE's frozen SemE shards), summed tensor by tensor;
- peak: the largest sum of live tensor storage bytes during forward, backward and the optimizer step,
  tracked with a ``TorchDispatchMode`` that sees every op's outputs and holds their storages by weak
  reference (plus the tensors that existed before: parameters, AdamW's moments, teacher, inputs), their
  sizes re-read after every op (FSDP2 frees a gathered block by resizing its storage to 0).
The activation profiles the plan builds on meta are also checked byte for byte against a real forward on
CPU, for every role (SemE, DetE's path, the frozen teacher's pass with grad).
This file is also the worker: ``torchrun … tests/test_memory_plan.py OUT``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
PERSISTENT_TOLERANCE = 0.15  # the bar: parameters + gradients + optimizer within 15%
PEAK_TOLERANCE = 0.15  # and the peak, activations and FSDP's gathered blocks included


def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_plan", module)
    spec.loader.exec_module(module)
    return module


def workloads():
    """name → (Workload, context parallel): the toy teacher (params.yaml's backbone.toy at the shapes world's
    size) and DESIGN.md's tiny real configurations."""
    mp = memory_plan()
    toy = dict(patch_size=(8, 2, 2), num_attention_heads=12, attention_head_dim=32, in_channels=12, out_channels=12,
               text_dim=64, freq_dim=64, ffn_dim=768, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    wan = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
               text_dim=384, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    hunyuan = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
                   num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                   text_embed_dim=384, pooled_projection_dim=384, rope_axes_dim=(8, 12, 12))
    cog = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
               text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
               temporal_compression_ratio=4, max_text_seq_length=16)
    common = dict(lora_rank=4, gan=False, fm=True)
    return {
        "toy": (mp.Workload("wan", toy, (12, 8, 8, 8), batch=4, text_tokens=8, name="toy", **common), 1),
        "wan": (mp.Workload("wan", wan, (16, 8, 16, 16), batch=2, text_tokens=7, name="wan tiny", **common), 1),
        "wan-cp2": (mp.Workload("wan", wan, (16, 8, 16, 16), batch=2, text_tokens=7, name="wan tiny", **common), 2),
        "hunyuan": (mp.Workload("hunyuan", hunyuan, (16, 8, 16, 16), batch=2, text_tokens=6, name="hunyuan tiny",
                                **common), 1),
        "cogvideox": (mp.Workload("cogvideox", cog, (4, 8, 16, 16), batch=2, text_tokens=16, name="cogvideox tiny",
                                  **common), 1),
    }


# ============================================================================ the worker (measured)

class LiveTensorBytes:
    """Largest sum of live tensor storage bytes: every op's outputs are tracked, their storages held by weak
    reference and dropped when freed.  ``existing`` tensors count from the start."""

    def __init__(self, existing):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live, self.current, self.peak = {}, 0, 0
        self._ref = StorageWeakRef

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    tracker.track(t)
                tracker.sweep()  # after every op: storages freed or resized since the last one
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()
        for t in existing:
            self.track(t)
        self.peak = self.current

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        t = getattr(t, "_local_tensor", t)  # a DTensor: its local shard
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        known = self.live.get(ptr)
        if known is not None:
            self.current -= known[1]
        self.live[ptr] = (self._ref(storage), storage.nbytes())
        self.current += storage.nbytes()

    def sweep(self) -> None:
        """Drop freed storages; re-read the size of the others: FSDP2 frees a gathered parameter by resizing
        its storage to 0 after forward (and back up to gather it again), which frees no storage object."""
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                self.current -= nbytes
                del self.live[ptr]
                continue
            now = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
            self.current += now - nbytes
            self.live[ptr] = (ref, now)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def measure(work, cp: int, stage: str, checkpointing: bool) -> dict:
    """One training step of ``stage`` on this rank; persistent and peak bytes (rank 0 holds the largest shards)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dcm.distill.losses import temporal_coherence
    from dcm.parallel.context import enable_context_parallel
    from dcm.parallel.fsdp import transformer_blocks

    mp = memory_plan()
    torch.manual_seed(0)
    teacher = mp.transformer_class(work.family)(**work.config).requires_grad_(False)  # frozen, a copy per rank
    student = copy.deepcopy(teacher).requires_grad_(True)
    if stage == "DetE":
        student = _make_dete(student, work, mp)
    if checkpointing:
        for m in (student, teacher):
            for module in m.modules():
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in transformer_blocks(student):
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    if cp > 1:
        enable_context_parallel(student, work.family)
        enable_context_parallel(teacher, work.family)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    inputs = mp.model_inputs(work, torch.float32, device="cpu", generator=g)
    if stage == "DetE":
        inputs["timestep"] = torch.full_like(inputs["timestep"], 300)  # below t_κ: DetE's phase
    x = inputs["hidden_states"]
    target = torch.randn(x.shape, generator=g)

    def step():
        out = student(**inputs, return_dict=False)[0]
        video = out.transpose(1, 2) if work.family == "cogvideox" else out
        loss = F.mse_loss(video, target.transpose(1, 2) if work.family == "cogvideox" else target)
        loss = loss + temporal_coherence(video, target.transpose(1, 2) if work.family == "cogvideox" else target, 3)
        if stage == "DetE":  # the teacher's feature pass on the student's output, with grad (DetE's fake features)
            feats = teacher(**{**inputs, "hidden_states": out}, return_dict=False)[0]
            loss = loss + feats.float().pow(2).mean()
            del feats
        loss.backward()

    step()  # the first step creates AdamW's moments: the steady state the plan predicts starts at the second
    opt.step()
    opt.zero_grad(set_to_none=True)  # as the loop does at the start of every step
    states = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    existing = [*student.parameters(), *teacher.parameters(), *teacher.buffers(), *student.buffers(), *states,
                *(v for v in inputs.values() if isinstance(v, torch.Tensor)), target]
    before = sum(local_bytes(t) for t in existing)
    start = time.time()
    with LiveTensorBytes(existing) as live:
        step()
        peak_backward = live.peak
        opt.step()
    persistent = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in trainable)
    persistent += sum(local_bytes(v) for state in opt.state.values() for v in state.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0)
    frozen = sum(local_bytes(p) for p in student.parameters() if not p.requires_grad)
    teacher_bytes = sum(local_bytes(p) for p in teacher.parameters())
    return {"persistent": persistent, "frozen": frozen, "teacher": teacher_bytes, "peak": live.peak,
            "peak_backward": peak_backward, "before": before, "seconds": time.time() - start}


def _make_dete(seme, work, mp):
    from types import SimpleNamespace

    from dcm.distill.experts import make_dete

    backbone = SimpleNamespace(timestep_layer_names=mp.TIMESTEP_LAYERS[work.family],
                               lora_target_modules=mp.LORA_TARGETS, model_timestep=lambda s: 1000.0 * s)
    return make_dete(seme, backbone, work.lora_rank, 2.0 * work.lora_rank, kappa=1, sigma_kappa=0.5)


def worker(out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, (work, cp) in workloads().items():
        for stage in ("SemE", "DetE"):
            for ckpt in (False, True):
                results[f"{name}/{stage}/{'ckpt' if ckpt else 'no-ckpt'}"] = measure(work, cp, stage, ckpt)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered}, indent=1))
    dist.destroy_process_group()


# ============================================================================ predicted vs measured

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "measured.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--standalone", __file__, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())["ranks"][0]  # rank 0: the largest shards


@pytest.fixture(scope="module")
def predicted():
    return predictions()


def predictions() -> dict:
    """The plan's rows for every workload at 2 GPUs (FSDP over both), fp32 compute, teacher replicated."""
    mp = memory_plan()
    out = {}
    for name, (work, cp) in workloads().items():
        st = mp.structure(work, torch.float32, cps=(cp,))
        setting = mp.Setting(gpus=2, cp=cp, compute="fp32")
        mp.check_setting(work, setting)
        rows = mp.plan(work, setting, st)
        adversarial_extras = st.disc_act[cp]  # taps and FM heads: not in the measured step
        for stage in ("SemE", "DetE"):
            r = rows[stage]
            persistent = r["parameters (fp32)"] + r["gradients (fp32)"] + r["optimizer (AdamW, 2 × fp32)"]
            extra = adversarial_extras if stage == "DetE" else 0
            for ckpt, key in ((False, "no checkpointing"), (True, "checkpointing")):
                out[f"{name}/{stage}/{'ckpt' if ckpt else 'no-ckpt'}"] = {
                    "persistent": persistent, "frozen": r["frozen student weights"],
                    "teacher": r["frozen teacher (fp32)"], "peak": r[f"total, {key}"] - r["VAE"] - extra}
    return out


@pytest.mark.slow
def test_predictions_match_measured_bytes_on_cpu(measured, predicted):
    lines = [f"{'case':34s} {'what':11s} {'predicted MiB':>14s} {'measured MiB':>13s} {'error':>7s}"]
    failures = []
    for case, m in measured.items():
        p = predicted[case]
        for what, tolerance in (("persistent", PERSISTENT_TOLERANCE), ("frozen", PERSISTENT_TOLERANCE),
                                ("teacher", 0.01), ("peak", PEAK_TOLERANCE)):
            if m[what] == 0 and p[what] == 0:
                continue
            error = (p[what] - m[what]) / m[what]
            lines.append(f"{case:34s} {what:11s} {p[what] / 2**20:14.3f} {m[what] / 2**20:13.3f} {100 * error:6.1f}%")
            if abs(error) > tolerance:
                failures.append(f"{case} {what}: predicted {p[what]} vs measured {m[what]} ({100 * error:.1f}%)")
    print("\n" + "\n".join(lines))
    assert not failures, failures


@pytest.mark.parametrize("name", ["toy", "wan", "hunyuan", "cogvideox"])
def test_meta_activation_profiles_equal_a_real_forward(name):
    """What autograd saves, block by block, is the same on meta (the plan) as in a real CPU forward of the same
    configuration: SemE, DetE on its path (adapters on, its copies of the timestep layers in), and the frozen
    teacher's pass with grad to its input."""
    mp = memory_plan()
    work, _ = workloads()[name]
    profiles = {}
    for role in mp.ROLES:
        meta = profiles[role] = mp.activation_profile(work, 1, torch.float32, role)
        torch.manual_seed(0)
        model = mp.transformer_class(work.family)(**work.config)
        net = _make_dete(model, work, mp) if role == "dete" else model
        inputs = mp.model_inputs(work, torch.float32, device="cpu", generator=torch.Generator().manual_seed(1))
        if role == "dete":  # below t_κ: the routing sends the batch to DetE
            inputs["timestep"] = torch.full_like(inputs["timestep"], 300)
        if role == "teacher":
            model.requires_grad_(False)
            inputs["hidden_states"].requires_grad_(True)
        real = mp.saved_bytes(lambda net=net, inputs=inputs: net(**inputs, return_dict=False)[0],
                              mp.family_blocks(model, work.family),
                              joint=work.family != "wan")
        assert meta.per_block == pytest.approx(real.per_block, rel=1e-3), role
        assert meta.outside == pytest.approx(real.outside, rel=1e-3), role
        assert meta.block_inputs == real.block_inputs, role
    # a frozen linear layer keeps no input for a weight gradient
    assert profiles["teacher"].no_checkpointing < profiles["seme"].no_checkpointing


# ============================================================================ the command

@pytest.mark.slow
@pytest.mark.parametrize("family,gpus,cp", [("wan", 1, 1), ("hunyuan", 8, 4), ("cogvideox", 2, 2)])
def test_plan_prints_parseable_table_for_every_family(family, gpus, cp, capsys, tmp_path):
    """The real configurations on meta, at the presets' sizes: the table parses, its JSON twin adds up."""
    mp = memory_plan()
    assert mp.main(["--family", family, "--gpus", str(gpus), "--gpu-mem-gb", "80", "--context-parallel", str(cp),
                    "--max-gpus", "8", "--json-out", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    print(text)
    rows = {line[:40].strip(): line[40:].split() for line in text.splitlines() if line[:40].strip()}
    assert float(rows["parameters (fp32)"][0]) > 0 and rows["fits 80 GiB, checkpointing"][0] in ("yes", "NO")
    assert float(rows["trajectory cache"][0]) > 0 and "smallest fit for SemE" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    for stage, column in (("SemE", 0), ("DetE", 1)):
        row = plan["per_gpu"][stage]
        assert row["parameters (fp32)"] > 0 and row["activations, no checkpointing"] > row["activations, checkpointing"]
        fixed = sum(v for k, v in row.items() if not k.startswith(("activations", "total")))
        assert row["total, checkpointing"] == fixed + row["activations, checkpointing"]
        assert float(rows["total, checkpointing"][column]) == pytest.approx(row["total, checkpointing"] / 2**30,
                                                                            abs=0.01)
    assert plan["tokens"] % cp == 0 and plan["disk"]["trajectory cache"] > 0


def test_sharded_sizes_are_fsdp2s_on_the_fake_group():
    """fully_shard under the fake process group gives rank 0's shard; the search's rule agrees."""
    mp = memory_plan()
    work, _ = workloads()["hunyuan"]
    sizes = mp.sharded_numels(mp.build(work), 3)  # asserts FSDP2's local sizes = the analytic rule inside
    local = sum(v[0] for v in sizes.values())
    total = sum(v[1] for v in sizes.values())
    assert total / 3 <= local < total / 3 * 1.05


def test_dmd2_fake_score_is_sharded_like_the_generator():
    """DMD2's fake score (the teacher's size) holds what the generator holds per GPU: all of it on one GPU,
    rank 0's shard under FSDP over two."""
    mp = memory_plan()
    work, cp = workloads()["wan"]
    st = mp.structure(work, torch.float32, cps=(cp,))
    held = {}
    for gpus in (1, 2):
        rows = mp.plan(work, mp.Setting(gpus=gpus, cp=cp, compute="fp32"), st)
        seme = rows["SemE"]
        generator = seme["parameters (fp32)"] + seme["gradients (fp32)"] + seme["optimizer (AdamW, 2 × fp32)"]
        held[gpus] = rows["DMD2"]["fake score (weights+grads+AdamW)"]
        assert held[gpus] == generator
    assert held[1] == 16 * st.total and 0.45 < held[2] / held[1] < 0.55


@pytest.mark.parametrize("argv,key,value,allowed", [
    (["--family", "hunyuan", "--gpus", "24", "--context-parallel", "5"], "training.parallel.context_parallel", "5",
     "allowed [1, 2, 3, 4, 6, 8, 12, 24]"),
    (["--family", "wan", "--gpus", "6", "--context-parallel", "4"], "training.parallel.context_parallel", "4",
     "world size 6"),
    (["--family", "wan", "--gpus", "8", "--shard-group", "3"], "training.parallel.shard_group_size", "3",
     "allowed [1, 2, 4, 8]"),
    (["--family", "cogvideox", "--variant", "13B", "--gpus", "8"], "--variant", "'13B'", "['2B', '5B']"),
])
def test_bad_combinations_fail_with_key_value_and_allowed(argv, key, value, allowed, capsys):
    assert memory_plan().main([*argv, "--gpu-mem-gb", "80"]) == 2
    err = capsys.readouterr().err
    assert key in err and value in err and allowed in err, err


if __name__ == "__main__":
    worker(sys.argv[1])


@pytest.mark.slow
def test_the_hunyuan_presets_layout_fits_the_gpus_of_its_slurm_rows(tmp_path, capsys):
    """The hunyuan preset's ``training.parallel`` (and the batch it gives) on slurm/resources-hunyuan.yaml's
    training rows: SemE, DetE and DMD2 each fit 80 GiB A100s with activation checkpointing, as the preset says."""
    import yaml

    from dcm import config

    raw = config.deep_merge(config.load_raw(REPO / "params.yaml", "hunyuan"), {"backbone": {"path": str(tmp_path)}})
    params = config.parse(raw)
    par = params.training.parallel
    assert params.training.gradient_checkpointing and par.strategy == "fsdp" and par.mixed_precision == "bf16"
    rows = yaml.safe_load((REPO / "slurm" / "resources-hunyuan.yaml").read_text())
    gpus = {rows[s]["nodes"] * rows[s]["gpus"] for s in ("train_seme", "train_dete", "train_baseline")}
    assert gpus == {24} and 24 % par.context_parallel == 0
    global_batch = params.training.batch_size * 24 // par.context_parallel * params.training.grad_accum
    assert global_batch == 6  # the paper's (24 A100s, sequence parallel 4, batch 1 per group)
    mp = memory_plan()
    argv = ["--family", "hunyuan", "--gpus", "24", "--gpu-mem-gb", "80", "--context-parallel",
            str(par.context_parallel), "--max-gpus", "8", "--json-out", str(tmp_path / "plan.json")]
    assert mp.main(argv + (["--shard-teacher"] if par.shard_teacher else [])) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "plan.json").read_text())
    usable = (80 - plan["reserve_gb"]) * 2**30
    for stage in ("SemE", "DetE", "DMD2"):
        assert plan["per_gpu"][stage]["total, checkpointing"] <= usable, stage
