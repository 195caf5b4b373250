"""The CLIP module: configs, presets, shapes, normalisation, text truncation, towers and state dict round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.errors import CheckpointError
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, CLIPConfig
from retrieval.model.family import build_towers
from retrieval.model.layers import QuickGELU

SOT, EOT = 49406, 49407


def _tokens(lengths: list[int], context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """Rows of SOT, `length` random word ids, EOT, zero padding — the tokenizer's layout."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = torch.randint(1, SOT, (length,), generator=gen)
        tokens[row, : length + 2] = torch.cat([torch.tensor([SOT]), words, torch.tensor([EOT])])
    return tokens


def _pixels(config: CLIPConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(name: str, towers: str = "both", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(PRESETS[name], towers=towers).eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_inferred_back_from_its_state_dict(name):
    config = PRESETS[name]
    with torch.device("meta"):
        state_dict = build_towers(config).state_dict()
    inferred = CLIPConfig.from_state_dict(state_dict, quick_gelu=config.quick_gelu, gelu_tanh=config.vision.gelu_tanh)
    assert inferred == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_survives_json(name):
    config = PRESETS[name]
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_config_dict_and_incomplete_state_dict_raise_checkpoint_errors():
    with pytest.raises(CheckpointError, match="invalid CLIP config"):
        CLIPConfig.from_dict({"embed_dim": 64, "vision": {"depth": 3}, "text": {}, "quick_gelu": True})
    with torch.device("meta"):
        state_dict = CLIP(PRESETS["tiny-vit"], towers="image").state_dict()
    with pytest.raises(CheckpointError, match="ln_final.weight"):
        CLIPConfig.from_state_dict(state_dict)


@pytest.mark.parametrize(("name", "params"), [("ViT-B/32", 151_277_313), ("RN50", 102_007_137)])
def test_openai_key_names_and_parameter_counts(name, params):
    with torch.device("meta"):
        model = CLIP(PRESETS[name])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == params  # openai/CLIP's published sizes
    assert shapes["transformer.resblocks.11.attn.in_proj_weight"] == (1536, 512)
    assert shapes["token_embedding.weight"] == (49408, 512)
    assert shapes["positional_embedding"] == (77, 512)
    assert {"ln_final.weight", "text_projection", "logit_scale"} <= shapes.keys()
    if name == "RN50":
        assert shapes["visual.layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
        assert shapes["visual.layer4.0.downsample.1.running_var"] == (2048,)
        assert shapes["visual.attnpool.positional_embedding"] == (50, 2048)
        assert shapes["visual.attnpool.c_proj.weight"] == (1024, 2048)
    else:
        assert shapes["visual.conv1.weight"] == (768, 3, 32, 32)
        assert shapes["visual.class_embedding"] == (768,)
        assert shapes["visual.positional_embedding"] == (50, 768)
        assert shapes["visual.transformer.resblocks.11.mlp.c_proj.weight"] == (768, 3072)
        assert shapes["visual.proj"] == (768, 512)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_embeddings_are_float32_unit_rows_unless_unnormalised(name):
    model = _model(name)
    pixels, tokens = _pixels(model.config), _tokens([3, 7, 0])
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(tokens)
        raw_image = model.encode_image(pixels, normalize=False)
        raw_text = model.encode_text(tokens, normalize=False)
    for emb, raw in ((image, raw_image), (text, raw_text)):
        assert emb.shape == raw.shape == (3, 64) and emb.dtype == raw.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), emb)


def test_resnet_stage_shapes():
    model = _model("tiny-rn")  # stem width 8, image 64
    visual = model.visual
    x = _pixels(model.config, batch=2)
    with torch.no_grad():
        stem = torch.relu(visual.bn1(visual.conv1(x)))
        assert stem.shape == (2, 4, 32, 32)  # stride-2 first convolution at half the stem width
        stem = torch.relu(visual.bn3(visual.conv3(torch.relu(visual.bn2(visual.conv2(stem))))))
        stem = visual.avgpool(stem)
        assert stem.shape == (2, 8, 16, 16)
        shapes = []
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            stem = stage(stem)
            shapes.append(tuple(stem.shape))
        assert visual.attnpool(stem).shape == (2, 64)
    assert shapes == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert all(not block.bn3.weight.detach().any() for block in visual.layer2)  # OpenAI's zero init


def test_vit_token_shapes():
    model = _model("tiny-vit")  # width 128, patch 8, image 32 -> 4x4 grid + class token
    visual = model.visual
    assert visual.positional_embedding.shape == (17, 128)
    with torch.no_grad():
        assert visual.conv1(_pixels(model.config, batch=2)).shape == (2, 128, 4, 4)
        assert visual(_pixels(model.config, batch=2)).shape == (2, 64)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_text_runs_only_the_real_tokens_with_the_same_result(quick_gelu):
    config = PRESETS["tiny-vit"]
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(config.embed_dim, config.vision, config.text, quick_gelu), towers="text").eval()
    tokens = _tokens([2, 11, 5])
    eot = tokens.argmax(dim=-1)
    with torch.no_grad():
        # All 77 positions, as openai/CLIP runs them.
        x = model.transformer(model.token_embedding(tokens) + model.positional_embedding)  # [3, 77, width]
        full = model.ln_final(x[torch.arange(3), eot]) @ model.text_projection
        short = model.encode_text(tokens, normalize=False)
        alone = model.encode_text(tokens[:1], normalize=False)  # a batch of one runs 4 positions, not 13
    # Mathematically identical; float32 kernels may sum in another order for another length, hence 1e-5.
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, short[:1], atol=1e-5, rtol=0)
    assert not torch.allclose(short[0], short[2])


def test_forward_scales_cosine_similarities_by_logit_scale():
    model = _model("tiny-vit")
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    pixels, tokens = _pixels(model.config, batch=2), _tokens([1, 4, 9])
    with torch.no_grad():
        per_image, per_text = model(pixels, tokens)
        expected = (1 / 0.07) * model.encode_image(pixels) @ model.encode_text(tokens).t()
    assert per_image.shape == (2, 3) and per_text.shape == (3, 2)
    torch.testing.assert_close(per_image, expected)
    assert torch.equal(per_text, per_image.t())


def test_half_precision_model_still_returns_float32():
    model = _model("tiny-vit").to(torch.bfloat16)
    with torch.no_grad():
        image = model.encode_image(_pixels(model.config))
        text = model.encode_text(_tokens([3]))
    assert image.dtype == text.dtype == torch.float32
    assert torch.isfinite(image).all() and torch.isfinite(text).all()


def test_single_tower_models_build_and_load_only_their_tower():
    full = _model("tiny-vit")
    state_dict = full.state_dict()
    text_only, image_only = CLIP(full.config, towers="text").eval(), CLIP(full.config, towers="image").eval()
    assert text_only.visual is None and not any(k.startswith("visual.") for k in text_only.state_dict())
    assert image_only.transformer is None and image_only.token_embedding is None
    assert all(k.startswith("visual.") or k == "logit_scale" for k in image_only.state_dict())

    text_only.load_state_dict(CLIP.state_dict_for_towers(state_dict, "text"), strict=True)
    image_only.load_state_dict(CLIP.state_dict_for_towers(state_dict, "image"), strict=True)
    pixels, tokens = _pixels(full.config), _tokens([5, 2])
    with torch.no_grad():
        assert torch.equal(image_only.encode_image(pixels), full.encode_image(pixels))
        assert torch.equal(text_only.encode_text(tokens), full.encode_text(tokens))
    with pytest.raises(RuntimeError, match="towers='image' or 'both'"):
        text_only.encode_image(pixels)
    with pytest.raises(RuntimeError, match="towers='text' or 'both'"):
        image_only.encode_text(tokens)
    stray = dict(state_dict, input_resolution=torch.tensor(32))
    assert "input_resolution" in CLIP.state_dict_for_towers(stray, "text")  # strays are left for strict loading


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="towers must be one of"):
        CLIP(PRESETS["tiny-vit"], towers="vision")
    with pytest.raises(ValueError, match="more than the context length 77"):
        _model("tiny-vit", towers="text").encode_text(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_state_dict_round_trip_is_bit_exact(tmp_path, name):
    model = _model(name, seed=0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = _model(name, seed=1)
    pixels, tokens = _pixels(model.config), _tokens([4, 1])
    with torch.no_grad():
        assert not torch.equal(fresh.encode_text(tokens), model.encode_text(tokens))
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        assert CLIPConfig.from_state_dict(fresh.state_dict()) == model.config
        assert torch.equal(fresh.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(fresh.encode_text(tokens), model.encode_text(tokens))


def test_quick_gelu_inference_path_matches_the_training_path():
    x = torch.randn(4, 16, requires_grad=True)
    trained = QuickGELU()(x)
    trained.sum().backward()
    with torch.no_grad():
        inferred = QuickGELU()(x)
    torch.testing.assert_close(inferred, trained.detach(), atol=0, rtol=0)
    torch.testing.assert_close(trained.detach(), x.detach() * torch.sigmoid(1.702 * x.detach()))
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_contrastive_loss_backpropagates_to_every_parameter(name):
    model = _model(name).train()
    per_image, per_text = model(_pixels(model.config, batch=2), _tokens([3, 6]))
    labels = torch.arange(2)
    loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.logit_scale.grad != 0 and model.text_projection.grad.abs().sum() > 0
