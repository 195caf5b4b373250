"""CLIP's byte-level BPE tokenizer, giving exactly the token ids of OpenAI's reference `simple_tokenizer`.

Text is cleaned the way the reference cleans it (ftfy, HTML unescaping twice, whitespace collapsed,
lowercased), split into words with the same pattern, each word's UTF-8 bytes mapped to printable
characters, and the characters merged by the 48,894 ranked BPE merges shipped in
`assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI's file, MIT licence, see `assets/LICENSE-CLIP-VOCAB.txt`).
The vocabulary is read only when the first text is tokenized. Token ids come out as numpy arrays: a text query
run through ONNX Runtime never imports torch (the model's own `tokenize` wraps them in a tensor).
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import itertools
import logging
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import TokenizerError

if TYPE_CHECKING:
    import regex

logger = logging.getLogger(__name__)

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# 256 byte symbols + 256 end-of-word byte symbols + 48,894 merges + 2 specials = 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
WORD_SUFFIX = "</w>"

# The reference pattern: the two specials, English contractions, runs of letters, single digits, and
# runs of anything else that is not whitespace. IGNORECASE is kept: it makes the letter class match
# U+0345 (a combining mark whose case folding is a letter), so dropping it would change ids.
_WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# The same pattern for lowercase printable ASCII, where letters are a-z, digits 0-9 and the only whitespace is the
# space, in the standard library's `re`: `regex` (and ftfy, see `_is_plain`) cost ~0.2 s to import, a good part of
# a one-shot query's start-up, and most queries are plain ASCII.
_ASCII_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+")
# Words are short and prompts repeat them; a bounded cache keeps memory flat on huge inputs.
_WORD_CACHE_SIZE = 1 << 16


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character, as CLIP's vocabulary spells bytes.

    Bytes that are already printable Latin-1 characters stand for themselves; the 68 others (controls,
    space, soft hyphen, ...) take the characters from U+0100 upwards, in byte order.

    Returns:
        Byte value -> one-character string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(spare)
            spare += 1
    return table


@functools.cache
def _unicode_patterns() -> tuple[regex.Pattern, regex.Pattern]:
    """The reference's word pattern and `regex`'s \\s+ (Unicode White_Space, which differs from `re`'s, e.g. at
    U+001C-U+001F: the reference collapses with `regex`, so must we), compiled on first use."""
    import regex

    return regex.compile(_WORD_PATTERN, regex.IGNORECASE), regex.compile(r"\s+")


def _is_plain(text: str) -> bool:
    """Printable ASCII without `&`: text that ftfy's fixes and HTML unescaping leave as it is (every fix needs a
    non-ASCII or control character, HTML entities an ampersand), so the ASCII path gives the same ids."""
    return text.isascii() and text.isprintable() and "&" not in text


def clean_text(text: str) -> str:
    """Normalise text exactly as CLIP's reference tokenizer does before splitting it into words.

    Args:
        text: Any text.

    Returns:
        The text after ftfy's fixes, two rounds of HTML unescaping, whitespace runs collapsed to one
        space, stripped, and lowercased.
    """
    if _is_plain(text):
        return " ".join(text.split()).lower()  # the only whitespace in printable ASCII is the space
    import ftfy  # ~0.1 s to import: only for text that may need its fixes

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _unicode_patterns()[1].sub(" ", text).strip().lower()


def _words(text: str) -> list[str]:
    """The words of a text as the reference pattern splits its cleaned form."""
    cleaned = clean_text(text)
    if _is_plain(text):
        return _ASCII_WORDS.findall(cleaned)
    return _unicode_patterns()[0].findall(cleaned)


def _read_vocab(path: str | os.PathLike[str] | None) -> list[str]:
    """Read the ranked merges ("a b" lines) from the gzip vocabulary file (the packaged one when `path` is None).

    Only the start of the file is decompressed: it holds ~5x more merges than CLIP's vocabulary uses, and a one-shot
    query pays for every millisecond of this (30 -> ~6 ms of CPU).
    """
    if path is None:
        data = importlib.resources.files(__package__).joinpath("assets", VOCAB_FILE).read_bytes()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer vocabulary {os.fspath(path)!r}: {e}") from e
    try:
        text = _decompress_lines(data, NUM_MERGES + 1)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer vocabulary is not a gzip'd UTF-8 file ({e}); use CLIP's {VOCAB_FILE}") from e
    # Line 0 is a version header; the file holds more merges than CLIP's vocabulary uses.
    merges = text.split("\n", NUM_MERGES + 1)[1 : NUM_MERGES + 1]
    joined = "\n".join(merges)
    # every line two non-empty parts around one space (checked over the whole text at once, not line by line)
    one_space = joined.count(" ") == len(merges) and not any(bad in joined for bad in ("\n ", " \n", "\t", "\r"))
    if len(merges) != NUM_MERGES or not one_space or joined.startswith(" ") or joined.endswith(" "):
        raise TokenizerError(f"tokenizer vocabulary lacks {NUM_MERGES} 'a b' merge lines; use CLIP's {VOCAB_FILE}")
    return merges


def _decompress_lines(data: bytes, lines: int) -> str:
    """The gzip'd text up to (at least) its first `lines` line ends, or all of it."""
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    parts, ends, step = [], 0, 1 << 16
    for start in range(0, len(data), step):
        part = stream.decompress(data[start : start + step])
        parts.append(part)
        ends += part.count(b"\n")
        if ends >= lines:
            break
    else:
        if not stream.eof:
            raise EOFError("the file ends before its gzip stream does")
    return b"".join(parts).decode("utf-8")


class Tokenizer:
    """CLIP's byte-level BPE tokenizer.

    Example:
        >>> tok = Tokenizer()
        >>> tok.decode(tok.encode("A photo of a cat"))
        'a photo of a cat'
    """

    def __init__(self, vocab_path: str | os.PathLike[str] | None = None) -> None:
        """Load the vocabulary.

        Args:
            vocab_path: A `bpe_simple_vocab_16e6.txt.gz`-format file; None uses the one in the package.

        Raises:
            TokenizerError: The file cannot be read or is not a CLIP vocabulary.
        """
        merges = _read_vocab(vocab_path)
        # "a b" -> rank. The token tables (`encoder`, `decoder`) are built only if asked for: a merged symbol's id
        # is 512 + the rank of the merge that made it, as every merge makes a distinct token (checked below for
        # a file passed in; the packaged file's 49,408 tokens are distinct, which its tests check).
        self.merge_ranks: dict[str, int] = dict(zip(merges, range(len(merges)), strict=True))
        self._merges = merges
        self.sot_token: int = 2 * 256 + len(merges)
        self.eot_token: int = self.sot_token + 1
        # str.translate on the Latin-1 reading of the UTF-8 bytes maps every byte in one C call.
        self._byte_table = byte_to_unicode()
        self._byte_ids = {c: i for i, c in enumerate(byte_to_unicode().values())}
        self._byte_decoder = {c: b for b, c in byte_to_unicode().items()}
        self._word_ids = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._encode_word)
        if vocab_path is not None and len(self.encoder) != self.vocab_size:
            raise TokenizerError(f"tokenizer vocabulary merges make repeated tokens; use CLIP's {VOCAB_FILE}")

    @functools.cached_property
    def decoder(self) -> list[str]:
        """Token id -> token string: the 256 byte symbols, the same ending a word, the merges, the two specials."""
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + WORD_SUFFIX for s in symbols] + [m.replace(" ", "") for m in self._merges]
        return [*vocab, START_OF_TEXT, END_OF_TEXT]

    @functools.cached_property
    def encoder(self) -> dict[str, int]:
        """Token string -> id (`decoder` inverted)."""
        return {token: i for i, token in enumerate(self.decoder)}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408 for CLIP's vocabulary)."""
        return 2 * 256 + len(self._merges) + 2

    def _bpe(self, symbols: list[str], ids: list[int]) -> list[int]:
        """Apply the merges to one word's symbols (with their ids), lowest-ranked adjacent pair first, until none
        applies; returns the ids of the symbols left."""
        ranks = self.merge_ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(" ".join(pair))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            merged_ids: list[int] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    merged_ids.append(2 * 256 + best_rank)
                    i += 2
                else:
                    merged.append(symbols[i])
                    merged_ids.append(ids[i])
                    i += 1
            symbols, ids = merged, merged_ids
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Token ids of one word as the pattern split it (cached)."""
        if word == START_OF_TEXT:
            return (self.sot_token,)
        if word == END_OF_TEXT:
            return (self.eot_token,)
        chars = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        symbols = [*chars[:-1], chars[-1] + WORD_SUFFIX]
        ids = [self._byte_ids[c] for c in chars[:-1]] + [256 + self._byte_ids[chars[-1]]]
        return tuple(self._bpe(symbols, ids))

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without the start/end tokens.

        Like the reference, a literal `<|startoftext|>` or `<|endoftext|>` in the text becomes that
        special token.

        Args:
            text: Any text.

        Returns:
            The ids, identical to OpenAI's `SimpleTokenizer.encode`.

        Raises:
            TokenizerError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"can only tokenize str, got {type(text).__name__}; convert it to text first")
        ids: list[int] = []
        for word in _words(text):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: words joined by single spaces, lowercased as encoding left them.

        Args:
            ids: Token ids (e.g. from `encode`); special tokens are spelled out.

        Returns:
            The decoded text, stripped; invalid UTF-8 becomes U+FFFD.

        Raises:
            TokenizerError: An id is outside the vocabulary.
        """
        pieces = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside 0..{self.vocab_size - 1}; pass ids this tokenizer made")
            pieces.append(self.decoder[i])
        raw = bytes(self._byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(WORD_SUFFIX, " ").strip()

    def tokenize(
        self,
        texts: str | Sequence[str],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        truncate: bool = False,
    ) -> np.ndarray:
        """Token ids of texts laid out for CLIP's text encoder.

        Each row is `<|startoftext|>`, the text's ids, `<|endoftext|>`, then zeros up to `context_length`.

        Args:
            texts: One text or a sequence of texts.
            context_length: Row length; 77 for every published CLIP model.
            truncate: Cut over-long texts so that `<|endoftext|>` is still the last id, instead of raising.

        Returns:
            int64 array of shape [N, context_length] (N = 1 for a single string).

        Raises:
            TokenizerError: A text is too long and `truncate` is False, or an input is not a string.
        """
        if context_length < 2:
            raise TokenizerError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) + 2 > context_length:
                if not truncate:
                    raise TokenizerError(
                        f"text {_shorten(text)} is {len(ids) + 2} tokens long (with start/end tokens), more than the"
                        f" context length of {context_length}; pass truncate=True or shorten it"
                    )
                ids = ids[: context_length - 2]
            result[row, : len(ids) + 2] = [self.sot_token, *ids, self.eot_token]
        return result


def _shorten(text: str, limit: int = 40) -> str:
    """Quote text for a one-line message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The tokenizer with the packaged vocabulary, loaded on first use and shared.

    Returns:
        A cached `Tokenizer`.
    """
    logger.debug("loading CLIP tokenizer vocabulary")
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str],
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    truncate: bool = False,
) -> np.ndarray:
    """Token ids of texts for CLIP's text encoder, with the packaged vocabulary.

    Args:
        texts: One text or a sequence of texts.
        context_length: Row length; 77 for every published CLIP model.
        truncate: Cut over-long texts so that `<|endoftext|>` is still the last id, instead of raising.

    Returns:
        int64 array of shape [N, context_length]: start token, text ids, end token, zero padding.

    Raises:
        TokenizerError: A text is too long and `truncate` is False.

    Example:
        >>> tokenize(["a photo of a cat", "a dog"]).shape
        (2, 77)
    """
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def token_count(text: str) -> int:
    """How many ids a text takes in a `tokenize` row, start and end tokens included; whatever does not fit
    the context length (77) is cut off.

    Example:
        >>> token_count("a photo of a cat")
        7
    """
    return len(default_tokenizer().encode(text)) + 2
