"""Export a trained DCM as a folder that stock diffusers + peft load, with no ``dcm`` code.

The toy pipeline is not a stock diffusers pipeline, so the export is its parts:

    transformer/                        SemE, diffusers format (WanTransformer3DModel.from_pretrained)
    dete_lora/                          DetE's PEFT LoRA adapter (peft.PeftModel.from_pretrained)
    dete_timestep_layers.safetensors    DetE's copies of the timestep layers, transformer key names
    scheduler/                          FlowMatchEulerDiscreteScheduler, shift 1: set_timesteps(sigmas=…)
                                        reproduces the student's sigmas exactly
    student_schedule.json               [(σ, expert)] of the few-step schedule, plus σ_κ
    README.md                           the loading recipe

Loading DetE with stock tools: a second ``from_pretrained`` of ``transformer/``,
``load_state_dict(timestep layers, strict=False)``, then ``PeftModel.from_pretrained(…, dete_lora/)``.
A full-copy DetE (rank 0, the +OD ablation) exports ``dete_transformer/`` instead of the two DetE parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from dcm import io, paths, schedule
from dcm.config import ConfigError, Params
from dcm.distill.experts import ADAPTER_DIR, FULL_DIR, DualExpert, load_dual_expert, timestep_layer_state

SCHEDULE_FILE = "student_schedule.json"

RECIPE = """# DCM export ({method})

Stock diffusers + peft only:

```python
import json, torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from peft import PeftModel
from safetensors.torch import load_file

seme = WanTransformer3DModel.from_pretrained("transformer")
dete = WanTransformer3DModel.from_pretrained("transformer")
dete.load_state_dict(load_file("dete_timestep_layers.safetensors"), strict=False)
dete = PeftModel.from_pretrained(dete, "dete_lora")
plan = json.load(open("student_schedule.json"))
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("scheduler")
scheduler.set_timesteps(sigmas=[s["sigma"] for s in plan["steps"]])
for step, t in zip(plan["steps"], scheduler.timesteps):
    model = seme if step["expert"] == "seme" else dete
    v = model(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=text, return_dict=False)[0]
    x = scheduler.step(v, t, x).prev_sample
```
"""


def export_dual_expert(dual: DualExpert, steps: list[schedule.SamplingStep], out: str | Path,
                       method: str = "dcm") -> Path:
    """Write ``dual`` and its sampling ``steps`` into ``out`` (atomically replaced)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    out = Path(out)
    with io.atomic_dir(out) as tmp:
        dual.materialize("seme").save_pretrained(tmp / "transformer")
        if dual.is_lora:
            dual.model.save_pretrained(tmp / "dete_lora")
            save_file(timestep_layer_state(dual), tmp / "dete_timestep_layers.safetensors")
        else:
            dual.dete_full.save_pretrained(tmp / "dete_transformer")
        # shift 1, no dynamic shifting: set_timesteps(sigmas=…) keeps the given sigmas as they are
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
                                        ).save_pretrained(tmp / "scheduler")
        plan = {"method": method, "kappa": dual.kappa, "sigma_kappa": dual.sigma_kappa,
                "dete_form": "lora" if dual.is_lora else "full", "final_sigma": 0.0,
                "steps": [{"sigma": s.sigma, "expert": s.expert} for s in steps]}
        (tmp / SCHEDULE_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        (tmp / "README.md").write_text(RECIPE.format(method=method))
    return out


def export(params: Params, method: str, out: str | Path | None = None) -> Path:
    """``dcm export --method M --out DIR``: the trained dual expert of M (default out: export/<method>)."""
    config = params.method(method)
    if config.kind != "dcm":
        raise ConfigError("--method", method, f"a method of kind 'dcm' (this one is {config.kind!r})")
    source = config.checkpoint_from or method
    seme_dir, dete_dir = paths.checkpoint(source, "seme"), paths.checkpoint(source, "dete")
    for folder, stage in ((seme_dir / FULL_DIR, "train_seme"), (dete_dir, "train_dete")):
        if not folder.exists():
            raise ConfigError(f"methods.{method}", str(folder), f"trained weights: run `dcm run {stage} --method {source}`")
    if not ((dete_dir / ADAPTER_DIR).is_dir() or (dete_dir / FULL_DIR).is_dir()):
        raise ConfigError(f"methods.{method}", str(dete_dir), "a DetE folder with adapter/ or transformer/")
    from dcm.backbones import load_teacher

    backbone = load_teacher(params, paths.TEACHER)
    dual = load_dual_expert(seme_dir, dete_dir, backbone)
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    steps = schedule.expert_schedule(grid, dual.kappa, config.sample_steps)
    return export_dual_expert(dual, steps, paths.EXPORT / method if out is None else out, method)
