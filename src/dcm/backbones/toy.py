"""The shapes-world teacher: diffusers' WanTransformer3DModel at a tiny size, a pixel-unshuffle codec
standing in for the VAE, and a small learned prompt encoder over the world's caption vocabulary.

Saved as a folder: ``transformer/`` and ``prompt_encoder/`` (both diffusers ``save_pretrained``)
plus ``backbone.json``; loaded back through the same ``from_pretrained`` code a real backbone uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from dcm.backbones.base import Backbone, PromptEmbeds, unwrap
from dcm.backbones.wan import WanOutputHead

PAD, UNK = "<pad>", "<unk>"


def caption_vocabulary(open_captions: bool = False) -> list[str]:
    """Every word the shapes world's caption grammar can produce, plus pad/unk; with ``open_captions``
    also the noun of a caption that leaves the shape open (``shapes.OPEN_SHAPE_WORD``).  Only then: a
    larger table would change the default teacher's initialisation."""
    from dcm.worlds import shapes

    words = {"a", "moves"} | set(shapes.SHAPES) | set(shapes.COLOURS) | set(shapes.TEXTURES)
    words |= set(shapes.DIRECTIONS) | set(shapes.SPEEDS)
    if open_captions:
        words.add(shapes.OPEN_SHAPE_WORD)
    return [PAD, UNK, *sorted(words)]


class PromptEncoder(ModelMixin, ConfigMixin):
    """Word embeddings + learned positions: a caption becomes (max_tokens, text_dim) features.

    The empty prompt (all padding) is the unconditional input for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, vocabulary: list[str], text_dim: int = 64, max_tokens: int = 8):
        super().__init__()
        self.word_index = {w: i for i, w in enumerate(vocabulary)}
        self.embed = nn.Embedding(len(vocabulary), text_dim)
        self.position = nn.Parameter(torch.randn(max_tokens, text_dim) * 0.02)
        self.norm = nn.LayerNorm(text_dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        n = self.config.max_tokens
        ids = torch.zeros(len(prompts), n, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z]+", prompt.lower())[:n]
            ids[row, : len(words)] = torch.tensor([self.word_index.get(w, 1) for w in words],
                                                  dtype=torch.long)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = (ids == 0).unsqueeze(-1)
        h = self.norm(self.embed(ids) + self.position)
        return h.masked_fill(pad, 0.0)  # padding carries no signal: the null prompt is all zeros


# Pixel statistics of shapes-world videos in [-1, 1] (dark-grey background, an 11 px object):
# mean -0.39, std 0.22.  Like a VAE's latents_mean / latents_std (Wan) the codec normalises with
# them, so latents have unit scale: un-normalised, x0 (std 0.22) drowns in ε (std 1) already at
# σ ≈ 0.2, and most of the σ range would carry no signal.
LATENT_MEAN = -0.39
LATENT_STD = 0.22


class PixelCodec:
    """Stand-in for a VAE: (B, 3, T, H, W) ↔ (B, 3·f², T, H/f, W/f) by pixel (un)shuffle, normalised
    to (x − mean) / std; exact up to float rounding."""

    def __init__(self, factor: int, mean: float = 0.0, std: float = 1.0):
        self.factor = factor
        self.mean = float(mean)
        self.std = float(std)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        z = F.pixel_unshuffle(frames, self.factor)
        z = z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
        return (z - self.mean) / self.std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents * self.std + self.mean
        b, c, t, h, w = latents.shape
        frames = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = F.pixel_shuffle(frames, self.factor)
        return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


class ToyBackbone(WanOutputHead, Backbone):
    family = "toy"
    guidance_mode = "cfg"
    # DetE's copies, Wan's official list (``WanBackbone``): the time/text embedder and the output norm and
    # projection; the output modulation table stays shared and frozen
    timestep_layer_names = ("condition_embedder", "norm_out", "proj_out")

    def __init__(self, transformer: WanTransformer3DModel, prompt_encoder: PromptEncoder, codec_factor: int,
                 guidance_scale: float = 4.0, latent_mean: float = LATENT_MEAN,
                 latent_std: float = LATENT_STD):
        self.transformer = transformer
        self.prompt_encoder = prompt_encoder
        self.codec = PixelCodec(codec_factor, latent_mean, latent_std)
        self.guidance_scale = guidance_scale

    # --------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, cfg, guidance_scale: float = 4.0, seed: int = 0, open_captions: bool = False
               ) -> ToyBackbone:
        """A randomly initialised toy teacher from ``ToyBackboneConfig`` (``open_captions``: its vocabulary
        has the open captions' words)."""
        torch.manual_seed(seed)
        channels = 3 * cfg.codec_factor**2
        transformer = WanTransformer3DModel(
            patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim, in_channels=channels, out_channels=channels,
            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        )
        encoder = PromptEncoder(vocabulary=caption_vocabulary(open_captions), text_dim=cfg.text_dim)
        return cls(transformer, encoder, cfg.codec_factor, guidance_scale)

    @classmethod
    def from_pretrained(cls, path: str | Path, guidance_scale: float | None = None) -> ToyBackbone:
        path = Path(path)
        meta_file = path / "backbone.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved toy backbone: {meta_file.name} is missing")
        meta = json.loads(meta_file.read_text())
        transformer = WanTransformer3DModel.from_pretrained(path / "transformer")
        encoder = PromptEncoder.from_pretrained(path / "prompt_encoder")
        scale = meta["guidance_scale"] if guidance_scale is None else guidance_scale
        # a folder saved before the codec normalised its latents: identity normalisation
        return cls(transformer, encoder, meta["codec_factor"], scale,
                   meta.get("latent_mean", 0.0), meta.get("latent_std", 1.0))

    def save(self, path: str | Path, transformer: nn.Module | None = None) -> None:
        path = Path(path)
        (transformer or self.transformer).save_pretrained(path / "transformer")
        self.prompt_encoder.save_pretrained(path / "prompt_encoder")
        meta = {"family": self.family, "codec_factor": self.codec.factor,
                "guidance_scale": self.guidance_scale, "latent_mean": self.codec.mean,
                "latent_std": self.codec.std}
        (path / "backbone.json").write_text(json.dumps(meta, indent=2) + "\n")

    # --------------------------------------------------------------------------- protocol
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        device = next(self.prompt_encoder.parameters()).device
        return PromptEmbeds(self.prompt_encoder(self.prompt_encoder.tokenize(prompts).to(device)))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(video)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents).clamp(-1, 1)

    def latent_shape(self, frames: int, size: int) -> tuple[int, int, int, int]:
        f = self.codec.factor
        return (3 * f * f, frames, size // f, size // f)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).blocks

    def forward(self, model, x, sigma, cond, guidance=None):
        timestep = (sigma * 1000.0).to(x.dtype).expand(x.shape[0])
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden.to(x.dtype),
                     return_dict=False)[0]

