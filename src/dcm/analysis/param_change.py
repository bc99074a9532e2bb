"""``dcm analyze params A B``: how much each part of the network moved between two checkpoints.

The analysis that motivated DetE's design (DCM, Sec. 3): after distillation the timestep-dependent
layers change far more, relative to their size, than the attention and FFN weights, so DetE copies
those layers and adapts the rest with LoRA.  For every module group

    relative change = ‖W_B − W_A‖_F / ‖W_A‖_F   (Frobenius norms over all tensors of the group)

Groups, by diffusers parameter names (Wan, HunyuanVideo, CogVideoX), first match wins:
timestep embedding (time/guidance embedders, time projections, ``scale_shift_table`` modulation),
output (``norm_out``, ``proj_out``), attention linears (``to_q/k/v``, ``to_out``, ``add_*_proj``,
``to_add_out``), FFN (``ff``, ``ffn``, ``mlp``), norms (any other ``norm``), other (patch and text
embeddings, …).

A checkpoint is a diffusers transformer folder, a folder holding ``transformer/`` (a dcm method's
``checkpoints/<m>``, ``checkpoints/<m>/seme``, ``models/teacher``), or a DetE folder
(``checkpoints/<m>/dete``): a LoRA DetE is merged into its SemE (``../seme``) with PEFT and its copied
timestep layers put in place, so the comparison is between plain weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

GROUPS = ("timestep embedding", "attention linears", "FFN", "norms", "output", "other")
_RULES = [
    ("timestep embedding", re.compile(r"time_embed|time_proj|timestep|time_text_embed|guidance_embed"
                                      r"|scale_shift_table")),
    ("output", re.compile(r"(^|\.)(norm_out|proj_out)(\.|$)")),
    ("attention linears", re.compile(r"(^|\.)(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj"
                                     r"|to_add_out)(\.|$)")),
    ("FFN", re.compile(r"(^|\.)(ff|ffn|ff_context|mlp|proj_mlp)(\.|$)")),
    ("norms", re.compile(r"norm")),
]


def group_of(name: str) -> str:
    for group, pattern in _RULES:
        if pattern.search(name):
            return group
    return "other"


def _safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _model_class(folder: Path):
    import diffusers

    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if not name or not hasattr(diffusers, name):
        raise ValueError(f"{folder}/config.json names no diffusers model class (_class_name = {name!r})")
    return getattr(diffusers, name)


def _merged_dete(dete: Path) -> dict[str, torch.Tensor]:
    """A LoRA DetE as plain weights: SemE + merged adapter, with DetE's copied timestep layers."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from dcm.distill.experts import ADAPTER_DIR, TIMESTEP_LAYERS_FILE

    seme = dete.parent / "seme" / "transformer"
    if not (seme / "config.json").is_file():
        raise FileNotFoundError(f"{dete} is a LoRA DetE: its SemE must be beside it at {seme}")
    base = _model_class(seme).from_pretrained(seme)
    merged = PeftModel.from_pretrained(base, dete / ADAPTER_DIR).merge_and_unload()
    result = merged.load_state_dict(load_file(str(dete / TIMESTEP_LAYERS_FILE)), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{dete}: timestep layers {result.unexpected_keys[:3]} are not in the SemE "
                         "transformer")
    return {k: v.detach() for k, v in merged.state_dict().items()}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The transformer weights a checkpoint path stands for (see the module docstring)."""
    from dcm.distill.experts import EXPERT_FILE, FULL_DIR

    path = Path(path)
    if (path / EXPERT_FILE).is_file():  # a DetE
        form = json.loads((path / EXPERT_FILE).read_text()).get("form")
        return _safetensors_state(path / FULL_DIR) if form == "full" else _merged_dete(path)
    if (path / "transformer").is_dir():
        path = path / "transformer"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: not a checkpoint; expected a diffusers transformer folder "
                                "(config.json + *.safetensors), a folder holding transformer/, or a DetE "
                                "folder (expert.json)")
    return _safetensors_state(path)


def relative_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{group: {relative_change, delta_norm, weight_norm, params, tensors}} for the groups present."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the checkpoints hold different tensors: only in A {only_a[:3]}, only in B "
                         f"{only_b[:3]}")
    acc = {g: {"delta_sq": 0.0, "weight_sq": 0.0, "params": 0, "tensors": 0} for g in GROUPS}
    for name, wa in a.items():
        wb = b[name]
        if wa.shape != wb.shape:
            raise ValueError(f"{name}: shape {tuple(wa.shape)} in A but {tuple(wb.shape)} in B")
        g = acc[group_of(name)]
        wa64, wb64 = wa.double(), wb.double()
        g["delta_sq"] += float(((wb64 - wa64) ** 2).sum())
        g["weight_sq"] += float((wa64 ** 2).sum())
        g["params"] += wa.numel()
        g["tensors"] += 1
    out = {}
    for group, g in acc.items():
        if g["tensors"]:
            delta, weight = g["delta_sq"] ** 0.5, g["weight_sq"] ** 0.5
            out[group] = {"relative_change": delta / weight if weight > 0 else float("inf") if delta else 0.0,
                          "delta_norm": delta, "weight_norm": weight, "params": g["params"],
                          "tensors": g["tensors"]}
    return out


def table(changes: dict[str, dict[str, float]]) -> str:
    lines = ["| module group | tensors | params | ‖W‖ | ‖ΔW‖ | ‖ΔW‖/‖W‖ |", "|---|---|---|---|---|---|"]
    for group, c in changes.items():
        lines.append(f"| {group} | {c['tensors']} | {c['params']} | {c['weight_norm']:.4g} | "
                     f"{c['delta_norm']:.4g} | {c['relative_change']:.4e} |")
    return "\n".join(lines)


def bar_plot(changes: dict[str, dict[str, float]], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(changes)
    values = [changes[g]["relative_change"] for g in names]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2e}" for v in values], fontsize=8)
    ax.set_ylabel("‖ΔW‖ / ‖W‖")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(a: str | Path, b: str | Path, plot: str | Path | None, json_path: str | Path | None = None) -> dict:
    changes = relative_change(load_weights(a), load_weights(b))
    print(f"relative weight change per module group: A = {a}, B = {b}")
    print(table(changes))
    if plot:
        bar_plot(changes, plot, f"{Path(b)} vs {Path(a)}")
        print(f"bar plot: {plot}")
    if json_path:
        Path(json_path).write_text(json.dumps({"a": str(a), "b": str(b), "groups": changes}, indent=2)
                                   + "\n")
    return changes
