"""A hub model's own tokenizer (`tokenizer.json`, e.g. Gemma's for SigLIP2), run the way open_clip runs it.

open_clip's `HFTokenizer` with `clean="canonicalize"` cleans each text like CLIP's tokenizer (ftfy, HTML
unescaped twice), then canonicalises it as big_vision does (underscores to spaces, ASCII punctuation removed,
lowercased, whitespace collapsed), and asks the Hugging Face tokenizer for exactly `context_length` ids,
truncated and padded with the pad token. The special tokens around the text (`<eos>` for SigLIP2) are
whatever the file's post-processor adds. We run the same file through the `tokenizers` library directly, so
`transformers` is not needed; a tokenizer_config.json beside it names the pad token and the padding side as
transformers reads them.
"""

from __future__ import annotations

import html
import json
import os
import string
from pathlib import Path

import ftfy
import numpy as np

from retrieval.errors import TokenizerError
from retrieval.model.files import TOKENIZER_CONFIG_FILE

DEFAULT_PAD_TOKEN = "<pad>"

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """open_clip's `_canonicalize_basic_clean`: CLIP's basic clean, then big_vision's canonical form."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())  # str.split's whitespace, as open_clip 3.x collapses it


class HubTokenizer:
    """Token ids from a `tokenizer.json`, padded and truncated to a fixed length.

    Args:
        path: the tokenizer.json file; a `tokenizer_config.json` beside it may name the pad token.
        context_length: the fixed number of ids per text (the text tower's positions).

    Raises:
        TokenizerError: the file is missing or not a tokenizer, or it has no pad token.
    """

    def __init__(self, path: str | os.PathLike[str], context_length: int) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception subclass for any unreadable file
            raise TokenizerError(
                f"cannot read {self.path} as a Hugging Face tokenizer.json ({e}); fetch the model's tokenizer.json "
                "from its hub repository again"
            ) from e
        config = _read_config(self.path.parent / TOKENIZER_CONFIG_FILE)
        pad_token = _token(config.get("pad_token")) or DEFAULT_PAD_TOKEN
        pad_id = self._tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise TokenizerError(f"{self.path} has no pad token {pad_token!r}; it is not the model's tokenizer.json")
        # transformers' defaults when the config does not say: Gemma's tokenizer class pads on the left.
        default_side = "left" if str(config.get("tokenizer_class", "")).startswith("Gemma") else "right"
        padding_side = config.get("padding_side") or default_side
        truncation_side = config.get("truncation_side") or "right"
        if {padding_side, truncation_side} - {"left", "right"}:
            raise TokenizerError(f"{self.path.parent / TOKENIZER_CONFIG_FILE}: sides must be 'left' or 'right'")
        self.pad_token, self.pad_id, self.context_length = pad_token, pad_id, context_length
        # Set once here: changing them per call would race between threads sharing the model.
        self._tokenizer.enable_truncation(max_length=context_length, direction=truncation_side)
        self._tokenizer.enable_padding(
            direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=context_length
        )

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Token ids [len(texts), context_length] (int64 numpy), padded and truncated as the config says."""
        encodings = self._tokenizer.encode_batch([canonicalize(t) for t in texts])
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)


def _read_config(config_file: Path) -> dict:
    """A tokenizer_config.json as a dict; empty when there is none."""
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {config_file} ({e}); fetch it again or remove it") from e
    return config if isinstance(config, dict) else {}


def _token(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or transformers' AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
