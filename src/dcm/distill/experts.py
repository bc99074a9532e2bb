"""SemE + DetE: the detail expert built from the semantic expert, per-sample routing, save/load.

DetE (METHODS.md, "DetE") is initialised from SemE with the backbone frozen; it trains a PEFT LoRA
adapter on every attention ``to_q``/``to_k``/``to_v``/``to_out.0`` plus copies of the
timestep-dependent layers (``backbone.timestep_layer_names``).  The LoRA adapter is injected into
SemE's own transformer, so the shared weights are stored once: SemE = that transformer with the
adapter disabled and its own timestep layers; DetE = adapter enabled and the copied layers swapped
in on the instance for the duration of the call.  With ``rank == 0`` (the +OD ablation, "two full
experts") DetE is a full trainable copy of SemE instead.

A teacher with two experts of its own (Wan 2.2 A14B: ``Backbone.two_experts``) gives DCM's two experts
their inits: SemE is the high-noise expert, fully fine-tuned; DetE is the low-noise expert (a frozen copy)
with the LoRA adapter and copies of its own timestep layers (``DualExpert`` form ``lora_on_expert``).

Routing is per sample: σ > σ_κ goes to SemE, σ ≤ σ_κ to DetE, compared on the transformer's timestep
input (t = 1000·σ, ``Backbone.model_timestep``), outputs reassembled in batch order (the official code
switched the whole batch on its first timestep).

On disk (``checkpoints/<method>/``): ``seme/transformer/`` (diffusers) and ``dete/`` holding
``adapter/`` (PEFT ``save_pretrained``), ``timestep_layers.safetensors`` and ``expert.json``
(κ, σ_κ, rank, alpha, names, form); the full-copy form stores ``dete/transformer/`` instead of the two.
The ``lora_on_expert`` form does not store its base: it is the teacher folder's ``transformer_2``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dcm.backbones.base import Backbone
from dcm.backbones.routing import TimestepRouted

EXPERT_FILE = "expert.json"
ADAPTER_DIR = "adapter"
TIMESTEP_LAYERS_FILE = "timestep_layers.safetensors"
FULL_DIR = "transformer"
# Routing compares t = 1000·σ; a grid point stored in float32 may sit a hair above σ_κ, while
# neighbouring grid points are ≥ 0.1 apart in t for any grid this project builds.
ROUTING_TOLERANCE_T = 1e-2


def _base_transformer(model: nn.Module) -> nn.Module:
    """The diffusers transformer under a PEFT wrapper (``PeftModel.get_base_model``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class DualExpert(TimestepRouted):
    """SemE and DetE behind the diffusers transformer's call signature, routed per sample by σ.

    Three forms (``form``):
    - ``lora``: DetE is a LoRA adapter injected into SemE's own transformer (``model``, a PeftModel) plus
      copies of the timestep layers, swapped in for DetE's calls: DCM's expert, initialised from SemE;
    - ``lora_on_expert``: DetE is a LoRA adapter on a transformer of its own (``dete_model``, a PeftModel
      over a frozen copy of the teacher's low-noise expert: Wan 2.2 A14B's ``transformer_2``) plus copies of
      that expert's timestep layers; SemE (``model``) is the plain high-noise student;
    - ``full``: DetE is a full trainable copy of SemE (``dete_full``; rank 0, the +OD ablation).
    """

    expert_names = ("seme", "dete")

    def __init__(self, seme: nn.Module, *, kappa: int, sigma_kappa: float,
                 timestep_layer_names: tuple[str, ...], rank: int, alpha: float,
                 timestep_layers: dict[str, nn.Module | nn.Parameter] | None = None,
                 dete_full: nn.Module | None = None, dete_model: nn.Module | None = None,
                 t_kappa: float | None = None):
        super().__init__()
        if (timestep_layers is None) == (dete_full is None):
            raise ValueError("DualExpert needs either LoRA timestep layers (rank > 0) or a full DetE "
                             "(rank == 0)")
        if dete_model is not None and dete_full is not None:
            raise ValueError("DualExpert: a DetE of its own base (dete_model) is a LoRA form, not a full "
                             "copy")
        self.model = seme  # the PeftModel (lora form) or the plain SemE transformer (other forms)
        self.kappa, self.sigma_kappa = int(kappa), float(sigma_kappa)
        # the transformer's timestep input at σ_κ (1000·σ_κ; a VP family maps it: Backbone.model_timestep)
        self.t_kappa = 1000.0 * self.sigma_kappa if t_kappa is None else float(t_kappa)
        self.timestep_layer_names = tuple(timestep_layer_names)
        self.rank, self.alpha = int(rank), float(alpha)
        self.dete_full = dete_full
        self.dete_model = dete_model
        self.dete_modules = nn.ModuleDict()
        self.dete_parameters = nn.ParameterDict()
        for name, layer in (timestep_layers or {}).items():
            (self.dete_parameters if isinstance(layer, nn.Parameter) else self.dete_modules)[name] = layer

    # ----------------------------------------------------------------------------- structure
    @property
    def form(self) -> str:
        if self.dete_full is not None:
            return "full"
        return "lora_on_expert" if self.dete_model is not None else "lora"

    @property
    def is_lora(self) -> bool:
        return self.dete_full is None

    @property
    def lora_model(self) -> nn.Module:
        """The PeftModel holding DetE's adapter (SemE's own transformer in the lora form)."""
        return self.dete_model if self.dete_model is not None else self.model

    @property
    def seme_transformer(self) -> nn.Module:
        return _base_transformer(self.model)

    @property
    def primary(self) -> nn.Module:
        return self.seme_transformer

    def dete_timestep_layer(self, name: str) -> nn.Module | nn.Parameter:
        return self.dete_parameters[name] if name in self.dete_parameters else self.dete_modules[name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """DetE's own parameters: LoRA A/B + copied timestep layers, or the whole full copy."""
        if not self.is_lora:
            return list(self.dete_full.parameters())
        lora = [p for n, p in self.lora_model.named_parameters() if "lora_" in n]
        return lora + list(self.dete_modules.parameters()) + list(self.dete_parameters.values())

    def freeze_seme(self) -> DualExpert:
        """Only DetE trains: SemE's (shared) weights frozen, DetE's own parameters trainable."""
        self.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        return self

    def parameter_counts(self) -> dict[str, float]:
        """Trainable DetE parameters and their fraction of one backbone (the SemE transformer)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        backbone = sum(p.numel() for n, p in self.seme_transformer.named_parameters() if "lora_" not in n)
        return {"dete_trainable_params": trainable, "backbone_params": backbone,
                "dete_trainable_fraction_of_backbone": trainable / backbone}

    # ----------------------------------------------------------------------------- experts
    @contextmanager
    def _dete_layers_swapped(self) -> Iterator[None]:
        """DetE's timestep layers in place of its base transformer's own, restored afterwards."""
        base = _base_transformer(self.lora_model)
        originals = {name: getattr(base, name) for name in self.timestep_layer_names}
        try:
            for name in self.timestep_layer_names:
                setattr(base, name, self.dete_timestep_layer(name))
            yield
        finally:
            for name, original in originals.items():
                setattr(base, name, original)

    @contextmanager
    def _adapter_disabled(self) -> Iterator[None]:
        """PEFT's ``disable_adapter``; re-enabling marks the adapter trainable, so the flags are restored."""
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n]
        flags = [p.requires_grad for p in lora]
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for p, flag in zip(lora, flags):
                p.requires_grad_(flag)

    def run_expert(self, expert: str, **inputs) -> torch.Tensor:
        """One expert on the whole (sub-)batch; ``inputs`` are the transformer's keyword arguments."""
        inputs["return_dict"] = False
        if expert == "seme":
            if self.form == "lora":
                if (torch.is_grad_enabled()
                        and getattr(self.seme_transformer, "gradient_checkpointing", False)):
                    # backward would recompute the blocks after the adapter is re-enabled: wrong gradients
                    raise RuntimeError("SemE under a LoRA DualExpert cannot run with grad and activation "
                                       "checkpointing (training.gradient_checkpointing); train SemE on its "
                                       "own")
                with self._adapter_disabled():
                    return self.model(**inputs)[0]
            return self.model(**inputs)[0]
        if expert == "dete":
            if self.is_lora:
                with self._dete_layers_swapped():
                    return self.lora_model(**inputs)[0]
            return self.dete_full(**inputs)[0]
        raise ValueError(f"expert must be 'seme' or 'dete', got {expert!r}")

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where a sample goes to SemE (its timestep above t_κ, the model timestep of σ_κ,
        by more than ``ROUTING_TOLERANCE_T``), False for DetE."""
        return timestep.detach().double() > self.t_kappa + ROUTING_TOLERANCE_T

    # ----------------------------------------------------------------------------- views
    def materialize(self, expert: str) -> nn.Module:
        """A stand-alone copy of one expert as a plain diffusers transformer (LoRA merged for DetE)."""
        if expert == "seme":
            model = copy.deepcopy(self.model)
            return model.unload() if self.form == "lora" else model  # unload: drops the adapter
        if expert == "dete":
            if not self.is_lora:
                return copy.deepcopy(self.dete_full)
            merged = copy.deepcopy(self.lora_model).merge_and_unload()
            for name in self.timestep_layer_names:
                setattr(merged, name, copy.deepcopy(self.dete_timestep_layer(name)))
            return merged
        raise ValueError(f"expert must be 'seme' or 'dete', got {expert!r}")


def make_dete(seme_transformer: nn.Module, backbone: Backbone, rank: int, alpha: float, *, kappa: int,
              sigma_kappa: float) -> DualExpert:
    """DetE initialised from the teacher's DetE init (``backbone.expert_transformer("dete")``): SemE itself
    for every single-expert teacher (takes ownership of ``seme_transformer``: the adapter is injected into
    it), a frozen copy of the low-noise expert for a two-expert teacher (Wan 2.2 A14B).

    rank > 0: LoRA (r = rank, lora_alpha = alpha) on every attention linear named by
    ``backbone.lora_target_modules`` + copies of ``backbone.timestep_layer_names``; rank == 0: a full copy.
    """
    if rank < 0:
        raise ValueError(f"lora rank must be >= 0, got {rank}")
    names = tuple(backbone.timestep_layer_names)
    common = dict(kappa=kappa, sigma_kappa=sigma_kappa, timestep_layer_names=names, rank=rank, alpha=alpha,
                  t_kappa=backbone.model_timestep(sigma_kappa))
    own_base = backbone.expert_transformer("dete") if getattr(backbone, "two_experts", False) else None
    base = seme_transformer if own_base is None else copy.deepcopy(own_base)
    if rank == 0:
        dete = copy.deepcopy(base) if own_base is None else base
        return DualExpert(seme_transformer, dete_full=dete.requires_grad_(True), **common).freeze_seme()
    if alpha <= 0:
        raise ValueError(f"lora alpha must be > 0 when rank > 0, got {alpha}")
    from peft import LoraConfig, get_peft_model

    missing = [n for n in names if not hasattr(base, n)]
    if missing:
        raise ValueError(f"timestep layers {missing} are not attributes of {type(base).__name__}")
    copies = {n: copy.deepcopy(getattr(base, n)) for n in names}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(backbone.lora_target_modules),
                        init_lora_weights=True)  # B = 0: DetE starts exactly at its base
    peft_model = get_peft_model(base, config)
    if own_base is None:
        return DualExpert(peft_model, timestep_layers=copies, **common).freeze_seme()
    return DualExpert(seme_transformer, timestep_layers=copies, dete_model=peft_model, **common).freeze_seme()


# ------------------------------------------------------------------------------------ storage


def save_dete(dual: DualExpert, dete_dir: str | Path) -> None:
    """DetE's own weights into ``dete_dir``: adapter/ + timestep_layers.safetensors (or transformer/) +
    expert.json."""
    from safetensors.torch import save as safetensors_bytes

    from dcm import io

    dete_dir = Path(dete_dir)
    dete_dir.mkdir(parents=True, exist_ok=True)
    if dual.is_lora:
        with io.atomic_dir(dete_dir / ADAPTER_DIR) as tmp:
            dual.lora_model.save_pretrained(tmp)
        io.write_bytes_atomic(dete_dir / TIMESTEP_LAYERS_FILE, safetensors_bytes(timestep_layer_state(dual)))
    else:
        with io.atomic_dir(dete_dir / FULL_DIR) as tmp:
            dual.dete_full.save_pretrained(tmp)
    meta = {"kappa": dual.kappa, "sigma_kappa": dual.sigma_kappa, "rank": dual.rank, "alpha": dual.alpha,
            "form": dual.form,
            "timestep_layer_names": list(dual.timestep_layer_names), **dual.parameter_counts()}
    io.write_json_atomic(dete_dir / EXPERT_FILE, meta)


def timestep_layer_state(dual: DualExpert) -> dict[str, torch.Tensor]:
    """DetE's copied timestep layers as a flat state dict in the transformer's own key names."""
    state: dict[str, torch.Tensor] = {}
    for name in dual.timestep_layer_names:
        layer = dual.dete_timestep_layer(name)
        if isinstance(layer, nn.Parameter):
            state[name] = layer.detach().cpu().contiguous()
        else:
            state.update({f"{name}.{k}": v.detach().cpu().contiguous()
                          for k, v in layer.state_dict().items()})
    return state


def load_dual_expert(seme_dir: str | Path, dete_dir: str | Path, backbone: Backbone) -> DualExpert:
    """SemE (``seme_dir/transformer``, diffusers) + DetE (``dete_dir``, as ``save_dete`` wrote it), frozen,
    eval."""
    from safetensors.torch import load_file

    seme_dir, dete_dir = Path(seme_dir), Path(dete_dir)
    meta_file = dete_dir / EXPERT_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{dete_dir} is not a saved DetE: {EXPERT_FILE} is missing "
                                "(run `dcm run train_dete`)")
    meta = json.loads(meta_file.read_text())
    if (meta["form"] == "lora_on_expert") != backbone.two_experts:
        raise ValueError(f"{dete_dir}: a DetE of form {meta['form']!r} does not belong to this teacher "
                         f"({'two experts' if backbone.two_experts else 'one transformer'}): re-run "
                         "`dcm run train_dete`")
    seme = type(backbone.expert_transformer("seme")).from_pretrained(seme_dir / FULL_DIR)
    common = dict(kappa=meta["kappa"], sigma_kappa=meta["sigma_kappa"], rank=meta["rank"],
                  alpha=meta["alpha"], t_kappa=backbone.model_timestep(meta["sigma_kappa"]),
                  timestep_layer_names=tuple(meta["timestep_layer_names"]))
    dete_class = type(backbone.expert_transformer("dete"))
    if meta["form"] == "full":
        dual = DualExpert(seme, dete_full=dete_class.from_pretrained(dete_dir / FULL_DIR), **common)
    else:
        from peft import PeftModel

        # the adapter's base: SemE itself, or a copy of the teacher's low-noise expert (not stored with DetE)
        base = seme if meta["form"] == "lora" else copy.deepcopy(backbone.expert_transformer("dete")).cpu()
        copies = {n: copy.deepcopy(getattr(base, n)) for n in common["timestep_layer_names"]}
        state = load_file(dete_dir / TIMESTEP_LAYERS_FILE)
        for name, layer in copies.items():
            if isinstance(layer, nn.Parameter):
                layer.data.copy_(state[name])
            else:
                prefix = f"{name}."
                layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        peft_model = PeftModel.from_pretrained(base, dete_dir / ADAPTER_DIR)
        if meta["form"] == "lora":
            dual = DualExpert(peft_model, timestep_layers=copies, **common)
        else:
            dual = DualExpert(seme, timestep_layers=copies, dete_model=peft_model, **common)
    device = next(backbone.transformer.parameters()).device
    return dual.requires_grad_(False).eval().to(device)
