"""The toy teacher: a tiny diffusers WanTransformer3DModel, a normalising pixel codec, a learned prompt
encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcm.backbones import create_teacher
from dcm.backbones.toy import PAD, UNK, ToyBackbone, caption_vocabulary
from dcm.worlds import shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone(params):
    return create_teacher(params)


def _inputs(backbone: ToyBackbone, params, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *backbone.latent_shape(params.world.frames, params.world.size), generator=g)
    sigma = torch.rand(batch, generator=g)
    cond = backbone.encode_prompts(["a red striped square moves left slowly",
                                    "a blue circle moves up quickly"][:batch])
    return x, sigma, cond


def test_saved_backbone_loads_back_with_bit_identical_outputs(backbone, params, tmp_path):
    backbone.save(tmp_path / "teacher")
    loaded = ToyBackbone.from_pretrained(tmp_path / "teacher")
    x, sigma, _ = _inputs(backbone, params)
    prompts = ["a green checked triangle moves down slowly", ""]
    with torch.no_grad():
        before = backbone.predict(backbone.transformer, x, sigma, backbone.encode_prompts(prompts))
        after = loaded.predict(loaded.transformer, x, sigma, loaded.encode_prompts(prompts))
    assert torch.equal(before, after)
    assert loaded.guidance_scale == backbone.guidance_scale
    assert loaded.codec.factor == backbone.codec.factor
    assert (loaded.codec.mean, loaded.codec.std) == (backbone.codec.mean, backbone.codec.std)


def test_loading_a_folder_without_backbone_json_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.json"):
        ToyBackbone.from_pretrained(tmp_path)


def test_empty_prompt_is_the_all_zero_null_embedding(backbone):
    null = backbone.encode_prompts([""])
    assert null.hidden.abs().sum() == 0
    assert backbone.encode_prompts(["a red square moves left slowly"]).hidden.abs().sum() > 0


def test_every_caption_word_has_its_own_token(backbone):
    vocabulary = caption_vocabulary()
    assert vocabulary[:2] == [PAD, UNK]
    ids = backbone.prompt_encoder.tokenize(shapes.all_captions())
    assert not (ids == vocabulary.index(UNK)).any()
    assert (ids[:, 0] != 0).all()  # no caption is empty


def test_captions_differing_in_one_word_embed_differently(backbone):
    a, b = backbone.encode_prompts(["a red square moves left slowly",
                                    "a red square moves right slowly"]).hidden
    assert not torch.allclose(a, b)


def test_pixel_codec_round_trip_is_exact_up_to_rounding(backbone, params):
    video = shapes.render(shapes.sample_scene(__import__("numpy").random.default_rng(3), params.world.size,
                                              params.world.frames), params.world.size,
                          params.world.frames)[None]
    latents = backbone.encode_video(video)
    assert latents.shape == (1, *backbone.latent_shape(params.world.frames, params.world.size))
    torch.testing.assert_close(backbone.decode_latents(latents), video, rtol=0, atol=1e-6)


def test_codec_latents_have_unit_scale(backbone, params):
    """Normalised like a VAE's latents: raw pixels (std 0.22) would drown in ε ~ N(0, 1) at small σ."""
    rng = __import__("numpy").random.default_rng(4)
    scenes = [shapes.sample_scene(rng, params.world.size, params.world.frames) for _ in range(64)]
    latents = backbone.encode_video(shapes.render_batch(scenes, params.world.size, params.world.frames))
    assert abs(latents.mean().item()) < 0.15
    assert 0.8 < latents.std().item() < 1.25


def test_a_folder_saved_without_latent_statistics_loads_with_identity_normalisation(backbone, tmp_path):
    import json

    backbone.save(tmp_path / "teacher")
    meta_file = tmp_path / "teacher" / "backbone.json"
    meta = json.loads(meta_file.read_text())
    del meta["latent_mean"], meta["latent_std"]
    meta_file.write_text(json.dumps(meta))
    loaded = ToyBackbone.from_pretrained(tmp_path / "teacher")
    assert (loaded.codec.mean, loaded.codec.std) == (0.0, 1.0)


def test_predict_with_features_returns_one_feature_per_second_block(backbone, params):
    x, sigma, cond = _inputs(backbone, params)
    with torch.no_grad():
        v, feats = backbone.predict(backbone.transformer, x, sigma, cond, features=True)
        v_plain = backbone.predict(backbone.transformer, x, sigma, cond)
    n_blocks = len(backbone.blocks(backbone.transformer))
    assert len(feats) == len(range(0, n_blocks, 2))
    assert v.shape == x.shape
    assert torch.equal(v, v_plain)
    inner = backbone.transformer.config.num_attention_heads * backbone.transformer.config.attention_head_dim
    for f in feats:
        assert f.shape[0] == x.shape[0] and f.shape[-1] == inner


def test_cfg_with_scale_one_equals_the_conditional_forward(backbone, params):
    x, sigma, cond = _inputs(backbone, params)
    uncond = backbone.null_prompts(2)
    with torch.no_grad():
        guided = backbone.guided_velocity(backbone.transformer, x, sigma, cond, uncond, scale=1.0)
        conditional = backbone.predict(backbone.transformer, x, sigma, cond)
    assert torch.equal(guided, conditional)


def test_batched_cfg_equals_two_separate_forwards(backbone, params):
    x, sigma, cond = _inputs(backbone, params)
    uncond = backbone.null_prompts(2)
    with torch.no_grad():
        guided = backbone.guided_velocity(backbone.transformer, x, sigma, cond, uncond, scale=3.0)
        v_c = backbone.predict(backbone.transformer, x, sigma, cond)
        v_u = backbone.predict(backbone.transformer, x, sigma, uncond)
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
