"""Parity with an independent SigLIP implementation: transformers' SiglipModel, converted through our rename table.

SigLIP2's fixed-resolution checkpoints use this architecture. Tolerance: 1e-5 max abs difference in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from retrieval.errors import CheckpointError
from retrieval.model.checkpoint import read_checkpoint, save_checkpoint
from retrieval.model.convert_siglip import config_from_hf, convert_hf_state_dict
from retrieval.model.loading import load_model

TOL = 1e-5
VOCAB, CONTEXT = 300, 16


def _hf_siglip(vision_act: str) -> transformers.SiglipModel:
    """A small random SiglipModel whose every parameter is perturbed, so a wrong mapping cannot hide."""
    tower = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=CONTEXT),
        vision_config=dict(tower, image_size=32, patch_size=8, hidden_act=vision_act),
    )
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _hf_features(model: transformers.SiglipModel, pixels: torch.Tensor, tokens: torch.Tensor):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens)
    # transformers 5 returns a model output whose pooler_output is the projected features.
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.mark.parametrize("vision_act", ["gelu_pytorch_tanh", "gelu"])
def test_hf_siglip_folder_matches_transformers(tmp_path, vision_act):
    hf = _hf_siglip(vision_act)
    hf.save_pretrained(tmp_path / "hf")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(2))
    hf_image, hf_text = _hf_features(hf, pixels, tokens)

    model, preprocess = load_model(tmp_path / "hf")
    assert model.config.family == "siglip" and model.config.vision.gelu_tanh == (vision_act != "gelu")
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), hf_image, atol=TOL, rtol=0)
        assert torch.allclose(model.encode_text(tokens), hf_text, atol=TOL, rtol=0)
        logits, _ = model(pixels, tokens)
        hf_logits = hf(input_ids=tokens, pixel_values=pixels).logits_per_image
    assert torch.allclose(logits, hf_logits, atol=1e-4, rtol=0)
    assert preprocess.resize_mode == "squash" and preprocess.mean == (0.5, 0.5, 0.5)

    # Our own format keeps the family and the activation; text and image towers load alone.
    save_checkpoint(model, tmp_path / "ours", name="tiny-siglip")
    text_only, _ = load_model(tmp_path / "ours", towers="text")
    assert text_only.visual is None
    with torch.no_grad():
        assert torch.allclose(text_only.encode_text(tokens), hf_text, atol=TOL, rtol=0)
    assert read_checkpoint(tmp_path / "ours").config == model.config


def test_every_hf_key_is_renamed_and_shape_checked():
    hf = _hf_siglip("gelu_pytorch_tanh")
    config = config_from_hf(hf.config.to_dict())
    state_dict = dict(hf.state_dict())
    state_dict["vision_model.head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unknown HF keys.*head.extra"):
        convert_hf_state_dict(state_dict, config)
    del state_dict["vision_model.head.extra"], state_dict["text_model.head.bias"]
    with pytest.raises(CheckpointError, match="missing.*text_projection.bias"):
        convert_hf_state_dict(state_dict, config)


def test_unsupported_hf_siglip_configs_are_refused():
    config = _hf_siglip("gelu").config.to_dict()
    config["text_config"]["hidden_act"] = "relu"
    with pytest.raises(CheckpointError, match="text tower needs gelu_pytorch_tanh"):
        config_from_hf(config)
