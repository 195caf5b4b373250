"""The tokenizer against golden ids from OpenAI's reference (see benchmarks/make_tokenizer_golden.py)."""

from __future__ import annotations

import hashlib
import html
import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import ClipsearchError, TokenizerError
from retrieval.model.tokenizer import VOCAB_FILE, Tokenizer, byte_to_unicode, default_tokenizer, tokenize

GOLDEN = Path(__file__).parent / "data" / "tokenizer_golden.jsonl"
HUB_TOKENIZER = Path(__file__).parent / "data" / "families" / "siglip2-b32-tiny" / "tokenizer.json"


def _golden(kind: str) -> list[dict]:
    """Records of one kind from the golden file."""
    with GOLDEN.open(encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


ENCODE_CASES = _golden("encode")
TOKENIZE_CASES = _golden("tokenize")


def _case_id(record: dict) -> str:
    """Short printable test id for a golden record."""
    return ascii(record["text"][:30])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def test_golden_file_covers_enough_and_matches_packaged_vocab():
    (meta,) = _golden("meta")
    packaged = importlib.resources.files("retrieval.model").joinpath("assets", VOCAB_FILE).read_bytes()
    assert hashlib.sha256(packaged).hexdigest() == meta["vocab_sha256"]
    assert len(ENCODE_CASES) >= 250
    assert len(TOKENIZE_CASES) >= 5
    notice = importlib.resources.files("retrieval.model").joinpath("assets", "LICENSE-CLIP-VOCAB.txt").read_text()
    assert VOCAB_FILE in notice and "Copyright (c) 2021 OpenAI" in notice and "MIT License" in notice


@pytest.mark.parametrize("record", ENCODE_CASES, ids=_case_id)
def test_encode_matches_reference_ids(tok, record):
    assert tok.encode(record["text"]) == record["ids"]


@pytest.mark.parametrize("record", TOKENIZE_CASES, ids=lambda r: f"{_case_id(r)}-L{r['context_length']}")
def test_truncating_tokenize_matches_reference(record):
    out = tokenize(record["text"], context_length=record["context_length"], truncate=record["truncate"])
    assert out[0].tolist() == record["tokens"]


def test_vocabulary_has_49408_entries(tok):
    assert tok.vocab_size == 49408
    assert len(tok.encoder) == 49408  # every token string is distinct
    assert (tok.sot_token, tok.eot_token) == (49406, 49407)
    assert tok.decoder[tok.sot_token] == "<|startoftext|>"
    assert tok.decoder[tok.eot_token] == "<|endoftext|>"
    assert all(tok.encoder[s] == i for i, s in enumerate(tok.decoder))


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_tokenize_shape_padding_and_special_tokens(tok):
    texts = ["a photo of a cat", "", "dog"]
    out = tokenize(texts)
    assert out.shape == (3, 77) and out.dtype == np.int64 and isinstance(out, np.ndarray)
    for row, text in zip(out.tolist(), texts, strict=True):
        ids = tok.encode(text)
        assert row[: len(ids) + 2] == [tok.sot_token, *ids, tok.eot_token]
        assert row[len(ids) + 2 :] == [0] * (77 - len(ids) - 2)
    assert out[1, :2].tolist() == [tok.sot_token, tok.eot_token]


def test_tokenize_single_string_empty_list_and_custom_length(tok):
    assert tokenize("a dog").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    assert tokenize(("a", "b"), context_length=8).shape == (2, 8)
    assert np.array_equal(tok.tokenize("a dog"), tokenize("a dog"))


def test_truncate_keeps_end_token_last(tok):
    text = " ".join(f"word{i}" for i in range(100))
    ids = tok.encode(text)
    assert len(ids) > 75
    row = tokenize(text, truncate=True)[0].tolist()
    assert row[0] == tok.sot_token and row[-1] == tok.eot_token
    assert row[1:-1] == ids[:75]
    short = tokenize("a photo of a cat", context_length=4, truncate=True)[0].tolist()
    assert short == [tok.sot_token, *tok.encode("a photo")[:2], tok.eot_token]


def test_text_that_exactly_fits_is_not_an_error(tok):
    fits = " ".join(["cat"] * 75)
    assert len(tok.encode(fits)) == 75
    assert tokenize(fits)[0, -1].item() == tok.eot_token
    with pytest.raises(TokenizerError):
        tokenize(fits + " cat")


def test_over_long_text_error_names_text_count_and_fix():
    text = "the quick brown fox jumps over the lazy dog\n" * 10
    with pytest.raises(TokenizerError) as info:
        tokenize(["fine", text])
    message = str(info.value)
    assert "\n" not in message
    assert "'the quick brown fox jumps over the lazy" in message and "…" in message
    assert "92 tokens" in message and "77" in message
    assert "truncate=True" in message and "shorten" in message
    assert len(message) < 200
    assert isinstance(info.value, ClipsearchError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "x", "hello world", "antidisestablishment"],
)
def test_decode_round_trips_plain_lowercase_ascii(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_spells_specials_and_cleans_case(tok):
    assert tok.decode(tokenize("A Photo")[0, :4].tolist()) == "<|startoftext|>a photo <|endoftext|>"
    assert tok.decode(tok.encode("Crème Brûlée 🐱")) == "crème brûlée 🐱"
    with pytest.raises(TokenizerError, match="outside 0..49407"):
        tok.decode([320, 49408])


def test_bad_inputs_raise_tokenizer_error():
    with pytest.raises(TokenizerError, match="can only tokenize str"):
        tokenize(["a cat", None])
    with pytest.raises(TokenizerError, match="context_length must be at least 2"):
        tokenize("a cat", context_length=1)


def test_explicit_vocab_path_and_bad_vocab_file(tmp_path, tok):
    packaged = importlib.resources.files("retrieval.model").joinpath("assets", VOCAB_FILE).read_bytes()
    good = tmp_path / VOCAB_FILE
    good.write_bytes(packaged)
    assert Tokenizer(good).encode("a photo of a cat") == tok.encode("a photo of a cat")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match="not a gzip"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer(tmp_path / "missing.txt.gz")


def test_vocabulary_loads_only_on_first_use():
    code = (
        "import retrieval.model.tokenizer as t\n"
        "assert t.default_tokenizer.cache_info().currsize == 0\n"
        "t.tokenize('a cat')\n"
        "assert t.default_tokenizer.cache_info().currsize == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tokenizing_never_imports_torch(tmp_path):
    # A text query through ONNX Runtime tokenizes in a process that must not pay for `import torch`.
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('the tokenizer must not import torch')\n")
    code = (
        "import sys\n"
        "from retrieval.model.tokenizer import tokenize, token_count\n"
        "out = tokenize(['a photo of a cat'], context_length=8)\n"
        "print(out.dtype, out.tolist(), token_count('a photo of a cat'), 'torch' in sys.modules)\n"
        "print('ftfy' in sys.modules, 'regex' in sys.modules)\n"
        "from retrieval.model.hub_tokenizer import HubTokenizer\n"
        f"hub = HubTokenizer({str(HUB_TOKENIZER)!r}, 16)(['a photo of a cat'])\n"
        "print(type(hub).__name__, hub.dtype, hub.shape, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    clip_line, plain_line, hub_line = result.stdout.splitlines()
    assert clip_line == "int64 [[49406, 320, 1125, 539, 320, 2368, 49407, 0]] 7 False"
    assert plain_line == "False False"  # plain ASCII needs neither ftfy nor regex (~0.2 s of a query's start-up)
    assert hub_line == "ndarray int64 (1, 16) False"


def test_the_plain_ascii_lane_splits_and_cleans_as_the_reference_pattern_does():
    # Printable ASCII without "&" skips ftfy and `regex`; it must give exactly the words of the full path.
    import ftfy

    from retrieval.model.tokenizer import _ASCII_WORDS, _is_plain, _unicode_patterns, clean_text

    words, spaces = _unicode_patterns()
    alphabet = [chr(c) for c in range(32, 127)] + ["'s", "'ll", "'T", "<|startoftext|>", "<|endoftext|>", "  ", "A1"]
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(20000)]
    texts += [record["text"] for record in ENCODE_CASES]
    checked = 0
    for text in texts:
        if not _is_plain(text):
            continue
        reference = spaces.sub(" ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip().lower()
        assert clean_text(text) == reference, text
        assert _ASCII_WORDS.findall(reference) == words.findall(reference), text
        checked += 1
    assert checked > 15000
    assert not _is_plain("a &amp; b") and not _is_plain("caf\u00e9") and not _is_plain("tab\there")
