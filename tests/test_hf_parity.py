"""Parity with an independent implementation: transformers' CLIPModel converted through our rename table.

Tolerance: 1e-5 max abs difference in fp32, for embeddings and for unnormalised projected features.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.errors import CheckpointError
from retrieval.model.clip import CLIP
from retrieval.model.convert_hf import config_from_hf, convert_hf_state_dict, read_hf_folder

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SOT, EOT = 49406, 49407  # CLIP's real start/end-of-text ids; EOT is the largest id, as both poolings assume
# Real BPE ids (openai/CLIP's simple_tokenizer) of texts of different lengths.
TEXTS = [
    [320, 1125, 539, 320, 2368],  # "a photo of a cat"
    [1237, 3255, 1629, 530, 518, 2583, 536, 930],  # "two dogs playing in the snow at night"
    [15304, 48338, 21078, 361],  # "café 東京"
    [],  # the empty string
]


def _tokens(context_length: int = 77) -> torch.Tensor:
    """[len(TEXTS), context_length] ids: SOT, the text, EOT, then zero padding as CLIP's tokenizer writes them."""
    tokens = torch.zeros(len(TEXTS), context_length, dtype=torch.long)
    for row, ids in enumerate(TEXTS):
        seq = [SOT, *ids, EOT]
        tokens[row, : len(seq)] = torch.tensor(seq)
    return tokens


def _hf_clip(hidden_act: str) -> transformers.CLIPModel:
    """A small random CLIPModel whose every parameter is perturbed, so a wrong mapping cannot hide."""
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act=hidden_act,
            eos_token_id=EOT,  # HF pools at the first EOT; with EOT the largest id that is OpenAI's argmax
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act=hidden_act,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_hf_clip_converts_to_identical_embeddings(tmp_path, hidden_act):
    hf = _hf_clip(hidden_act)
    hf.save_pretrained(tmp_path)

    state_dict, config = read_hf_folder(tmp_path)
    assert config.quick_gelu == (hidden_act == "quick_gelu")
    assert (config.embed_dim, config.vision.heads, config.text.heads) == (32, 4, 4)
    ours = CLIP(config).eval()
    ours.load_state_dict(state_dict, strict=True)

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = _tokens()
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=pixels).pooler_output
        hf_text = hf.get_text_features(input_ids=tokens).pooler_output
        hf_out = hf(input_ids=tokens, pixel_values=pixels)
        our_image = ours.encode_image(pixels, normalize=False)
        our_text = ours.encode_text(tokens, normalize=False)
        logits_per_image, logits_per_text = ours(pixels, tokens)

    assert our_image.dtype == our_text.dtype == torch.float32
    assert (our_image - hf_image).abs().max() < TOL
    assert (our_text - hf_text).abs().max() < TOL
    assert (ours.encode_image(pixels) - hf_out.image_embeds).abs().max() < TOL
    assert (ours.encode_text(tokens) - hf_out.text_embeds).abs().max() < TOL
    assert (logits_per_image - hf_out.logits_per_image).abs().max() < 1e-4  # scaled by exp(logit_scale) ~ 14
    assert (logits_per_text - hf_out.logits_per_text).abs().max() < 1e-4


def test_conversion_names_wrong_shapes_and_missing_keys():
    hf = _hf_clip("quick_gelu")
    config = config_from_hf(hf.config.to_dict())
    hf_sd = dict(hf.state_dict())

    bad_shape = dict(hf_sd, **{"visual_projection.weight": torch.zeros(32, 65)})
    with pytest.raises(CheckpointError, match=r"visual\.proj: shape \(65, 32\), expected \(64, 32\)"):
        convert_hf_state_dict(bad_shape, config)

    missing = {k: v for k, v in hf_sd.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['ln_final\.bias'\]"):
        convert_hf_state_dict(missing, config)

    half_qkv = {k: v for k, v in hf_sd.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(CheckpointError, match=r"only the \['q', 'v'\] projections of transformer\.resblocks\.1"):
        convert_hf_state_dict(half_qkv, config)

    odd_q = dict(hf_sd, **{"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(64, 65)})
    with pytest.raises(CheckpointError, match=r"q/k/v projections of visual\.transformer\.resblocks\.0\.attn"):
        convert_hf_state_dict(odd_q, config)

    unknown = dict(hf_sd, **{"vision_model.head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unknown HF keys \['vision_model\.head\.weight'\]"):
        convert_hf_state_dict(unknown, config)


def test_unsupported_hf_configs_are_refused(tmp_path):
    base = _hf_clip("quick_gelu").config.to_dict()
    mixed = dict(base, text_config=dict(base["text_config"], hidden_act="gelu"))
    with pytest.raises(CheckpointError, match="activations"):
        config_from_hf(mixed)
    wide_mlp = dict(base, vision_config=dict(base["vision_config"], intermediate_size=300))
    with pytest.raises(CheckpointError, match="not 4x"):
        config_from_hf(wide_mlp)
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_folder(tmp_path)
