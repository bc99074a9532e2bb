"""What the real teachers (wan, hunyuan, hunyuan15, cogvideox) share: a diffusers pipeline folder on local
disk.

The folder is the pipeline layout ``save_pretrained`` writes and the released ``*-Diffusers``
repositories ship (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, …).  It is read with the pipeline's own ``from_pretrained`` on a
path with ``local_files_only=True``: never a hub id, never the network.

The ``teacher`` stage does not train a real teacher: it checks the folder and *records* it into
``models/teacher/backbone.json`` (``record_teacher``): family, pipeline class, absolute folder, sha256
of its config files (model_index, component configs, tokenizer files, weight-file names and sizes: a
changed folder is caught without hashing 10⁹ weights).

The ``preprocess`` stage encodes every prompt of data/prompts.json (train and eval rows, the videos'
captions, the negative prompt) once with the folder's text encoders into the sharded prompt store
``data/preprocessed/prompts/`` (``prompt_tensors``; ``dcm.shards``).  Every later stage loads the
recorded folder without its text encoders and reads that store (``load_prompt_store``): a prompt that
is not in it is an error, never a reason to load the encoders.

Precision: the transformer loads in fp32 (master weights; the training loop autocasts to bf16 on
GPU), the text encoders and the VAE in ``backbone.real.text_dtype`` / ``vae_dtype``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from abc import abstractmethod
from pathlib import Path

import torch
from torch import nn

from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.config import ConfigError, RealBackboneConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECORD_FILE = "backbone.json"
TEXT_BATCH = 16  # prompts per text-encoder call
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")  # hashed by content
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # hashed by name and size
CONFIG_ONLY = ("tokenizer", "tokenizer_2", "scheduler", "guider")  # components without weights


class PipelineBackbone(Backbone):
    """A ``Backbone`` around a diffusers pipeline object; subclasses set the class attributes below."""

    pipeline_class_name: str = ""  # diffusers pipeline class of the folder
    components: tuple[str, ...] = ()  # sub-folders the folder must have
    text_components: tuple[str, ...] = ()  # loaded only when a prompt misses the prompt table
    network_components: tuple[str, ...] = ("transformer", "vae")  # skipped by ``networks=False``
    default_max_sequence_length: int = 256

    def __init__(self, pipe, settings: RealBackboneConfig, guidance_scale: float,
                 path: str | Path | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = getattr(pipe, "vae", None)
        self.settings = settings
        self.guidance_scale = float(guidance_scale)
        self.path = Path(path).resolve() if path is not None else None
        self.device = torch.device("cpu")
        self.prompt_table: dict[str, PromptEmbeds] = {}  # prompt -> one row, on the CPU
        # set by load_prompt_store: the table is the preprocessed store's, the text encoders stay unloaded
        self.prompt_store: Path | None = None
        if self.vae is not None:
            if settings.vae_tiling:
                self.vae.enable_tiling()
            if settings.vae_slicing and hasattr(self.vae, "enable_slicing"):
                self.vae.enable_slicing()

    # --------------------------------------------------------------------------- the folder
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def check_folder(cls, path: str | os.PathLike | None, key: str = "backbone.path") -> Path:
        """The folder, resolved; a ConfigError naming every missing component otherwise."""
        if not path:
            raise ConfigError(key, path,
                              f"a local {cls.pipeline_class_name} folder for family '{cls.family}'")
        folder = Path(os.path.expanduser(str(path))).resolve()
        if not folder.is_dir():
            raise ConfigError(key, str(path),
                              f"an existing local {cls.pipeline_class_name} folder (never a hub id)")
        missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
        index = {}
        if not missing:
            index = json.loads((folder / "model_index.json").read_text())
            found = index.get("_class_name")
            if found not in (None, cls.pipeline_class_name):
                raise ConfigError(key, str(path),
                                  f"a {cls.pipeline_class_name} folder for family '{cls.family}', "
                                  f"not a {found} (check backbone.family)")
        for name in cls.required_components(index):
            sub = folder / name
            if not sub.is_dir() or not any(sub.iterdir()):
                missing.append(f"{name}/")
            elif name not in CONFIG_ONLY and not _has_weights(sub):
                missing.append(f"{name}/ weights (*.safetensors or *.bin)")
        if missing:
            raise ConfigError(key, str(path),
                              f"a {cls.pipeline_class_name} folder ({', '.join(cls.components)}); "
                              f"missing: {', '.join(missing)}")
        return folder

    @classmethod
    def required_components(cls, index: dict) -> tuple[str, ...]:
        """The sub-folders a folder with this ``model_index.json`` must have (its family's components;
        Wan adds ``transformer_2`` where the index names one)."""
        return cls.components

    @classmethod
    def from_folder(cls, path: str | os.PathLike, settings: RealBackboneConfig, guidance_scale: float,
                    text_encoders: bool = False, networks: bool = True) -> PipelineBackbone:
        """Load the pipeline from a local folder: transformer (fp32) and VAE, text encoders only if asked."""
        folder = cls.check_folder(path)
        skip = {} if text_encoders else dict.fromkeys(cls.text_components)
        if not networks:
            skip.update(dict.fromkeys(cls.network_components))
        dtypes = {"default": torch.float32, "vae": DTYPES[settings.vae_dtype],
                  **dict.fromkeys(cls.text_components, DTYPES[settings.text_dtype])}
        backbone = cls(cls.load_pipeline(folder, dtypes, skip), settings, guidance_scale, folder)
        if backbone.transformer is not None:
            backbone.transformer.eval().requires_grad_(False)
        if backbone.vae is not None:
            backbone.vae.eval().requires_grad_(False)
        return backbone

    @classmethod
    def load_pipeline(cls, folder: Path, dtypes: dict, skip: dict):
        """The pipeline class's own ``from_pretrained`` on the local folder, ``skip`` naming the components
        passed in (None: not loaded)."""
        return cls.pipeline_class().from_pretrained(folder, local_files_only=True, torch_dtype=dtypes, **skip)

    def load_text_encoders(self) -> None:
        """The text encoders of the folder, loaded once (they are skipped while the prompt table suffices)."""
        self._load_components(self.text_components, DTYPES[self.settings.text_dtype])

    def load_vae(self) -> None:
        """The VAE of a folder loaded without its networks (the ``preprocess`` stage encodes videos)."""
        self._load_components(("vae",), DTYPES[self.settings.vae_dtype])
        self.vae = self.pipe.vae
        if self.settings.vae_tiling:
            self.vae.enable_tiling()
        if self.settings.vae_slicing and hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()

    def _load_components(self, names: tuple[str, ...], dtype: torch.dtype) -> None:
        """Components of the folder not loaded yet, by model_index.json's class, frozen, on this device."""
        missing = [n for n in names if getattr(self.pipe, n, None) is None]
        if not missing:
            return
        if self.path is None:
            raise RuntimeError(f"{type(self).__name__}: no {missing} and no folder to load them from")
        index = json.loads((self.path / "model_index.json").read_text())
        for name in missing:
            library, class_name = index[name]
            model_class = getattr(importlib.import_module(library), class_name)
            module = model_class.from_pretrained(self.path / name, torch_dtype=dtype, local_files_only=True)
            self.pipe.register_modules(**{name: module.eval().requires_grad_(False).to(self.device)})

    def config_digest(self) -> str:
        return folder_config_digest(self.path)

    # --------------------------------------------------------------------------- prompts
    @property
    def max_sequence_length(self) -> int:
        return self.settings.max_sequence_length or self.default_max_sequence_length

    def encode_text(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own ``encode_prompt`` on its T5-style encoder (Wan, CogVideoX); Wan's pipeline
        zeroes the padded positions, CogVideoX's returns the encoder's outputs there.  Families with other
        text inputs (Hunyuan: pooled + mask) override this."""
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return PromptEmbeds(embeds)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The prompts' embeddings from the table; a prompt missing from it is encoded (text encoders loaded
        once) unless the table is the preprocessed store's, where a missing prompt is an error."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.prompt_table))
        if missing and self.prompt_store is not None:
            raise ConfigError(str(self.prompt_store), missing[:3],
                              f"prompts of data/prompts.json ({len(missing)} not in the preprocessed store; "
                              "the text encoders are not loaded after preprocessing): re-run "
                              "`dcm run preprocess`")
        if missing:
            self.load_text_encoders()
            with torch.no_grad():
                encoded = self.encode_text(missing).to("cpu")
            for i, prompt in enumerate(missing):
                self.prompt_table[prompt] = encoded.index(slice(i, i + 1))
        return PromptEmbeds.cat([self.prompt_table[p] for p in prompts]).to(self.device)

    def null_prompts(self, batch: int) -> PromptEmbeds:
        return self.encode_prompts([self.settings.negative_prompt] * batch)

    # --------------------------------------------------------------------------- video
    def video_latent_shape(self, params) -> tuple[int, int, int, int]:
        real = params.backbone.real
        return self.latent_shape_hw(real.frames, real.height, real.width)

    def latent_shape(self, frames: int, size: int) -> tuple[int, int, int, int]:
        return self.latent_shape_hw(frames, size, size)

    @abstractmethod
    def latent_shape_hw(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of a video of this size."""

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior mode → the transformer's latent space (the VAE's scaling factor; Wan overrides)."""
        return z * self.vae.config.scaling_factor

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        return self.normalize_latents(z)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.denormalize_latents(latents.float()).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    # --------------------------------------------------------------------------- devices, saving
    def to(self, device: torch.device | str) -> PipelineBackbone:
        self.device = torch.device(device)
        for name in (*self.network_components, *self.text_components):
            module = getattr(self.pipe, name, None)
            if isinstance(module, nn.Module):
                module.to(self.device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """The record of the folder (backbone.json): what later stages check the configured folder against."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / RECORD_FILE).write_text(json.dumps(self.record(), indent=2) + "\n")

    def record(self) -> dict:
        return {"family": self.family, "pipeline": self.pipeline_class_name, "path": str(self.path),
                "config_sha256": self.config_digest(), "guidance_mode": self.guidance_mode,
                "guidance_scale": self.guidance_scale, "settings": dataclasses.asdict(self.settings)}

    # --------------------------------------------------------------------------- the prompt store
    def prompt_tensors(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One shard of the prompt store: the text conditioning of ``prompts`` (``{j}.hidden`` and
        ``{j}.<extra>`` for the j-th prompt), encoded by the folder's text encoders in batches of
        TEXT_BATCH."""
        self.load_text_encoders()
        tensors: dict[str, torch.Tensor] = {}
        for start in range(0, len(prompts), TEXT_BATCH):
            with torch.no_grad():
                encoded = self.encode_text(prompts[start:start + TEXT_BATCH]).to("cpu")
            for j in range(len(encoded)):
                row = encoded.index(slice(j, j + 1))
                tensors[f"{start + j}.hidden"] = row.hidden.clone()  # its own storage: safetensors
                tensors.update({f"{start + j}.{k}": v.clone() for k, v in (row.extra or {}).items()})
        return tensors

    def load_prompt_store(self, folder: str | os.PathLike, config_sha256: str) -> None:
        """The preprocessed prompt store (``dcm run preprocess``) as this backbone's prompt table; the store
        must have been made from this very folder (``config_sha256``) with these text settings."""
        from dcm.shards import ShardStore, StoreError

        try:
            store = ShardStore(folder, producer="`dcm run preprocess`")
        except StoreError as e:
            raise ConfigError(str(folder), "missing",
                              f"the prompt store of `dcm run preprocess` ({e})") from None
        made = store.index.get("teacher", {})
        if made.get("config_sha256") != config_sha256 or made.get("text") != self.text_settings():
            raise ConfigError(str(folder), made, "a prompt store made from the recorded folder with these "
                              "text settings: re-run `dcm run preprocess`")
        for i, shard in enumerate(store.shards):
            tensors = store.tensors(i)
            for j, row in enumerate(shard["rows"]):
                extra = {k.split(".", 1)[1]: v for k, v in tensors.items()
                         if k.startswith(f"{j}.") and k != f"{j}.hidden"}
                self.prompt_table[row["prompt"]] = PromptEmbeds(tensors[f"{j}.hidden"], extra or None)
        self.prompt_store = Path(folder)

    def text_settings(self) -> dict:
        """What a prompt's stored embedding depends on besides the folder."""
        return {"max_sequence_length": self.max_sequence_length, "text_dtype": self.settings.text_dtype}

    # --------------------------------------------------------------------------- network helpers
    def timestep(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """t = 1000·σ per sample (flow-matching families)."""
        return (sigma.reshape(-1).to(x.device, torch.float32) * 1000.0).expand(x.shape[0])


# ------------------------------------------------------------------------------------ helpers


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in folder.rglob("*"))


def folder_config_digest(folder: str | os.PathLike) -> str:
    """sha256 over the folder's config/tokenizer files (content) and its weight files (name and size)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        if file.suffix in CONFIG_SUFFIXES:
            digest.update(f"{rel}\0".encode() + hashlib.sha256(file.read_bytes()).digest())
        elif file.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
    return digest.hexdigest()


def read_record(folder: str | os.PathLike) -> dict:
    file = Path(folder) / RECORD_FILE
    if not file.is_file():
        raise ConfigError(str(folder), str(file), "a recorded teacher: run `dcm run teacher` first")
    return json.loads(file.read_text())
