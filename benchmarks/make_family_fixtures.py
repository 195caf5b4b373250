"""Write tests/data/families/: tiny checkpoints of each model family in its reference's own layout, with the
reference's outputs, so the normal test environment checks parity without open_clip, timm or torchvision.

Run it in an environment with the reference implementations (open_clip_torch, timm, torchvision, transformers):

    /work/refenv/bin/python benchmarks/make_family_fixtures.py

For each family it builds the model with open_clip (timm image towers for SigLIP2 and MobileCLIP2, reduced by
passing smaller sizes to timm's own model functions), perturbs every parameter so no tensor keeps a trivial
init, rounds the weights to float16 (to keep the files small) and saves them as open_clip's hub does:
`open_clip_model.safetensors` + `open_clip_config.json` (`save_config_for_hf`), plus the Gemma-style
tokenizer for SigLIP2 (`tokenizer.json` + `tokenizer_config.json`, saved by transformers' GemmaTokenizerFast
configured as open_clip's SigLipTokenizer configures it). `reference.npz` holds open_clip's outputs in
float32: preprocessed pixels of a generated image, image and text embeddings, and the token ids.
`tokenizer_golden.jsonl` holds open_clip's `HFTokenizer(clean="canonicalize")` ids for every text of the CLIP
tokenizer corpus at two context lengths.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "families"
CORPUS = ROOT / "tests" / "data" / "tokenizer_golden.jsonl"
SEED = 0
WIDTH = 64  # one 64-channel head per block, the head width our configs infer
TEXT_CONTEXT = 16
TOKENIZER_VOCAB = 700
GOLDEN_LENGTHS = (16, 64)
EXTRA_TEXTS = [
    "",
    " ",
    "A photo of a CAT!!!",
    "snake_case_words and hyphen-ated ones",
    "Ünïcödé àccents — and “quotes”",
    "日本語のテキストと中文文本",
    "emoji 🐶🐱🚀 mixed with text",
    "&amp;lt;html&amp;gt; entities",
    "word " * 200,
]
TIMM_OVERRIDES = {"embed_dim": WIDTH, "depth": 2, "num_heads": 1, "img_size": 64}
# FastViT-MCi0's layout at an eighth of its width (8..64, so the attention stage keeps 32-channel heads).
MOBILECLIP_OVERRIDES = {"layers": (2, 1, 1, 2), "embed_dims": (8, 16, 32, 64)}


def corpus_texts() -> list[str]:
    """The CLIP tokenizer golden corpus's texts plus a few edge cases.

    Texts with lone surrogates are left out: they are not valid UTF-8, and Hugging Face tokenizers refuse them.
    """
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if '"kind": "encode"' in line]
    return [t for t in texts + EXTRA_TEXTS if _is_utf8(t)]


def _is_utf8(text: str) -> bool:
    """Whether a str encodes to UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_tokenizer(folder: Path, texts: list[str]) -> None:
    """A Gemma-style BPE (byte fallback, "▁" spaces), saved the way open_clip's SigLIP2 tokenizer is set up."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)]
    )
    tok.train_from_iterator([t.lower() for t in texts], trainer)
    # open_clip's SigLipTokenizer("gemma"): right padding, no <bos>, <eos> appended, pad id 0.
    wrapped = GemmaTokenizerFast(tokenizer_object=tok, padding_side="right", add_bos_token=False, add_eos_token=True)
    wrapped.save_pretrained(str(folder))


def patch_timm() -> None:
    """Make timm's SigLIP model functions build width-64, 2-block, 64 px towers for the fixtures."""
    import timm

    create = timm.create_model

    def create_small(name: str, **kwargs):
        return create(name, **{**kwargs, **TIMM_OVERRIDES})

    timm.create_model = create_small


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter, then round to float16 and back (the stored weights are exactly these)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
            param.copy_(param.half().float())


def sample_image() -> Image.Image:
    """A 50x37 RGB gradient with a coloured block (not square, so resize modes differ)."""
    y, x = np.mgrid[0:37, 0:50]
    pixels = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)
    pixels[10:20, 5:25] = (200, 30, 90)
    return Image.fromarray(pixels, "RGB")


def write_fixture(out: Path, name: str, model_cfg: dict, pretrained_pp: dict, texts: list[str], tokenizer_dir=None):
    """Build one family's tiny model with open_clip and write its checkpoint folder and reference outputs."""
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name,
        image_mean=pretrained_pp["mean"],
        image_std=pretrained_pp["std"],
        image_interpolation=pretrained_pp["interpolation"],
        image_resize_mode=pretrained_pp["resize_mode"],
    )
    model.eval()
    perturb(model, SEED)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(tensors, str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_cfg)

    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
        tokenizer = open_clip.tokenizer.HFTokenizer(
            str(folder), context_length=model_cfg["text_cfg"]["context_length"], clean="canonicalize"
        )
        tokens = tokenizer(texts)
    else:
        # CLIP pools at the largest id (its end-of-text token): random words, then the top id, then padding.
        gen = torch.Generator().manual_seed(SEED)
        vocab, length = model_cfg["text_cfg"]["vocab_size"], model_cfg["text_cfg"]["context_length"]
        tokens = torch.zeros(len(texts), length, dtype=torch.long)
        for row in range(len(texts)):
            n = 1 + row * 7 % (length - 2)
            tokens[row, : n + 1] = torch.cat(
                [torch.randint(1, vocab - 1, (n,), generator=gen), torch.tensor([vocab - 1])]
            )
    image = sample_image()
    pixels = torch.stack(
        [preprocess(image), torch.randn(3, *preprocess(image).shape[1:], generator=torch.Generator().manual_seed(1))]
    )
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.savez_compressed(
        folder / "reference.npz",
        image_png=np.frombuffer(buffer.getvalue(), dtype=np.uint8),
        pixels=pixels.numpy(),
        image_features=image_features.numpy(),
        tokens=tokens.numpy(),
        text_features=text_features.numpy(),
        texts=np.array(texts if tokenizer_dir is not None else [], dtype=object).astype(str),
    )
    print(f"wrote {folder}: {sum(f.stat().st_size for f in folder.iterdir()) / 1024:.0f} KiB")


def perturb_buffers(model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics (rounded to float16), so fusing them is really tested."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_((torch.randn(buffer.shape, generator=gen) * 0.2).half().float())
            elif name.endswith("running_var"):
                buffer.copy_((0.5 + torch.rand(buffer.shape, generator=gen)).half().float())


def write_mobileclip_fixture(out: Path) -> None:
    """A reduced MobileCLIP2 (FastViT-MCi0 layout at stem width 8, 64 px; 2-layer text tower) in open_clip's hub
    layout, train-time form, with open_clip's outputs before and after timm's `reparameterize_model`, timm's
    re-parameterised state dict, and the full-size S0/S2 shapes and parameter counts of both forms."""
    import open_clip
    import timm
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file
    from timm.utils.model import reparameterize_model

    create = timm.create_model

    def create_small(name: str, **kwargs):
        return create(name, **{**kwargs, **MOBILECLIP_OVERRIDES}) if name == "fastvit_mci0" else create(name, **kwargs)

    sizes = {}
    for full in ("MobileCLIP2-S0", "MobileCLIP2-S2"):
        model = open_clip.create_model(full, pretrained=None).eval()
        fused = reparameterize_model(model)
        sizes[full] = {
            "visual_params_train": sum(p.numel() for p in model.visual.parameters()),
            "visual_params_reparam": sum(p.numel() for p in fused.visual.parameters()),
            "text_params": sum(p.numel() for p in model.text.parameters()),
            "train_shapes": {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith("visual.")},
            "reparam_shapes": {k: list(v.shape) for k, v in fused.state_dict().items() if k.startswith("visual.")},
        }
    (out / "mobileclip2-full-shapes.json").write_text(json.dumps(sizes) + "\n")

    timm.create_model = create_small
    name = "mobileclip2-s0-tiny"
    model_cfg = {
        "embed_dim": WIDTH,
        "vision_cfg": {
            "timm_model_name": "fastvit_mci0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": None,
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": 64,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 500,
            "width": WIDTH,
            "heads": 1,
            "layers": 2,
            "no_causal_mask": True,
        },
        "custom_text": True,
    }
    # open_clip's MobileCLIP2-S0/S2 pretrained preprocessing (_mccfg): no normalisation, bilinear, shortest side.
    pp = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear", "resize_mode": "shortest"}
    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name,
        image_mean=pp["mean"],
        image_std=pp["std"],
        image_interpolation=pp["interpolation"],
        image_resize_mode=pp["resize_mode"],
    )
    model.eval()
    perturb(model, SEED)
    perturb_buffers(model, SEED)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Train-time form as open_clip saves it, BatchNorm's num_batches_tracked included.
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_cfg)

    gen = torch.Generator().manual_seed(SEED)
    vocab, length = 500, 77
    tokens = torch.zeros(5, length, dtype=torch.long)
    for row in range(5):
        n = 1 + row * 13 % (length - 2)
        tokens[row, : n + 1] = torch.cat([torch.randint(1, vocab - 1, (n,), generator=gen), torch.tensor([vocab - 1])])
    image = sample_image()
    pixels = torch.stack(
        [preprocess(image), torch.rand(3, *preprocess(image).shape[1:], generator=torch.Generator().manual_seed(1))]
    )
    fused = reparameterize_model(model)
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        image_features_reparam = fused.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    fused_tensors = {
        k: (v.contiguous() if k.startswith("visual.") or not v.is_floating_point() else v.half().contiguous())
        for k, v in fused.state_dict().items()
    }
    save_file(fused_tensors, str(folder / "timm_reparameterized.safetensors"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.savez_compressed(
        folder / "reference.npz",
        image_png=np.frombuffer(buffer.getvalue(), dtype=np.uint8),
        pixels=pixels.numpy(),
        image_features=image_features.numpy(),
        image_features_reparam=image_features_reparam.numpy(),
        tokens=tokens.numpy(),
        text_features=text_features.numpy(),
        texts=np.array([], dtype=str),
    )
    timm.create_model = create
    print(f"wrote {folder}: {sum(f.stat().st_size for f in folder.iterdir()) / 1024:.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", choices=("mobileclip",), help="write only these fixtures")
    args = parser.parse_args()
    import open_clip
    import timm
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    write_mobileclip_fixture(args.out)
    if args.only:
        return
    texts = corpus_texts()
    tokenizer_dir = Path(tempfile.mkdtemp())
    make_tokenizer(tokenizer_dir, texts)
    tokenizer_files = {f.name for f in tokenizer_dir.iterdir()}
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()

    golden = args.out / "tokenizer_golden.jsonl"
    with golden.open("w") as f:
        meta = {
            "kind": "meta",
            "reference": f"open_clip {open_clip.__version__} HFTokenizer(clean='canonicalize')",
            "transformers": transformers.__version__,
            "generator": "benchmarks/make_family_fixtures.py",
            "tokenizer": "siglip2-b32-tiny/tokenizer.json",
        }
        f.write(json.dumps(meta) + "\n")
        for length in GOLDEN_LENGTHS:
            reference = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=length, clean="canonicalize")
            for text in texts:
                ids = reference([text])[0].tolist()
                f.write(json.dumps({"text": text, "context_length": length, "ids": ids}) + "\n")
    print(f"wrote {len(texts) * len(GOLDEN_LENGTHS)} token id records to {golden} (tokenizer files {tokenizer_files})")

    patch_timm()
    siglip_pp = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash"}
    siglip_text = {
        "context_length": TEXT_CONTEXT,
        "vocab_size": vocab_size,
        "hf_tokenizer_name": "",
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": WIDTH,
        "heads": 1,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
        "act_kwargs": {"approximate": "tanh"},
    }
    prompts = ["a photo of a cat", "A DOG, running!", "", "日本語のテキスト", "emoji 🐶", "word " * 40]
    for name, timm_name in (
        ("siglip2-b32-tiny", "vit_base_patch32_siglip_256"),
        ("siglip2-b16-tiny", "vit_base_patch16_siglip_256"),
    ):
        model_cfg = {
            "embed_dim": WIDTH,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": {
                "image_size": 64,
                "timm_model_name": timm_name,
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": siglip_text,
        }
        write_fixture(args.out, name, model_cfg, siglip_pp, prompts, tokenizer_dir)

    openai_pp = {
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    # LAION/DataComp style (exact GELU, no quick_gelu in the config) and DFN style (quick_gelu: true).
    for name, quick_gelu, image_size, patch_size in (
        ("openclip-b32-256-tiny", False, 64, 32),
        ("openclip-b16-quickgelu-tiny", True, 32, 16),
    ):
        model_cfg = {
            "embed_dim": WIDTH,
            "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": WIDTH, "patch_size": patch_size},
            "text_cfg": {"context_length": 77, "vocab_size": 500, "width": WIDTH, "heads": 1, "layers": 1},
        }
        write_fixture(args.out, name, model_cfg, openai_pp, ["x"] * 4)
    print(f"timm {timm.__version__}, open_clip {open_clip.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
