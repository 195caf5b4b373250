"""Write tests/data/tokenizer_golden.jsonl: token ids from OpenAI's reference CLIP tokenizer.

The reference is the `clip-anytorch` wheel (OpenAI's `clip/` package). `import clip` needs torchvision,
so this script loads `clip/simple_tokenizer.py` by file path and takes `tokenize()` out of `clip/clip.py`
by parsing it, then runs both unmodified. How the file in the repository was made:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install clip-anytorch --no-deps ftfy regex
    /work/venv/bin/python benchmarks/make_tokenizer_golden.py \\
        --clip-dir /tmp/refvenv/lib/python3.11/site-packages/clip

Run it with a Python that has torch, ftfy and regex (the project venv). ftfy's fixes can change between
versions, so the first line of the output records the ftfy and regex versions the ids were made with.

Output, one JSON object per line:
    {"kind": "meta", ...}                                         versions and the vocabulary's sha256
    {"kind": "encode", "text": ..., "ids": [...]}                 SimpleTokenizer().encode(text)
    {"kind": "tokenize", "text": ..., "context_length": L, "truncate": true, "tokens": [...]}
                                                                  clip.tokenize(text, L, truncate=True)[0]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import typing
from pathlib import Path
from typing import Any

import torch

# Knobs.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenizer_golden.jsonl"
RANDOM_SEED = 20240601
RANDOM_STRINGS = 60
TRUNCATE_LENGTHS = (77, 16, 5, 2)

PROMPTS = [
    "a photo of a cat",
    "A photo of a dog.",
    "a diagram",
    "a dog",
    "a cat",
    "a photo of a red car parked on the street",
    "an aerial view of a city at night",
    "a close-up photo of a bee on a sunflower",
    "two people walking on the beach at sunset",
    "a black and white photo of an old lighthouse",
    "a painting of a mountain lake in the style of Monet",
    "a screenshot of a spreadsheet",
    "a blurry photo of a bird",
    "a bad photo of the kitchen",
    "a sketch of a bicycle",
    "a tattoo of a dragon",
    "itap of a cup of coffee",
    "the toy car is on the table",
    "a picture of my grandmother's birthday cake",
    "children playing football in the park",
    "snow-covered pine trees under a blue sky",
    "receipt from the grocery store",
    "whiteboard with handwritten notes",
    "a cozy living room with a fireplace",
    "sunrise over the Grand Canyon",
    "a golden retriever puppy",
    "a tabby cat sleeping on a laptop keyboard",
    "the Eiffel Tower at night",
    "a plate of spaghetti carbonara",
    "boats in a harbour",
    "a scanned document",
    "a selfie",
    "a group photo at a wedding",
    "a street market in Marrakesh",
    "a pdf page",
    "an x-ray of a hand",
    "a photo of a hot dog",
    "a photo of a hotdog",
    "antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious",
    "xqzjvwk bfghtt",
    "a",
    "I",
    "ok",
]

PUNCTUATION = [
    "hello, world!",
    "what?!",
    "wait... what???",
    "e-mail: someone@example.com",
    "https://example.com/path?q=cats&sort=new#top",
    "C:\\Users\\me\\Pictures\\IMG_0001.JPG",
    "/home/user/photos/2023/summer/beach.jpeg",
    "(parenthesised) [bracketed] {braced} <angled>",
    "#hashtag @mention $dollar %percent ^caret *star",
    "~tilde `backtick` |pipe| _underscore_",
    "a--b---c----d",
    "!!!!!!!!!!!!!!!!!!!!",
    ".",
    ",",
    "-",
    "'",
    '"quoted"',
    "“curly quotes” and ‘single’",
    "em—dash and en–dash",
    "ellipsis… bullet • middot ·",
    "a/b\\c|d",
    "semi;colon:colon",
    "+-*/=<>",
    "snake_case_name and kebab-case-name",
    "camelCaseName and PascalCaseName",
]

NUMBERS = [
    "2023",
    "3.14159",
    "1,000,000",
    "-42",
    "1e10",
    "0x1F600",
    "IMG_20230815_123456.jpg",
    "room 101",
    "4K UHD 60fps",
    "top 10 photos of 2019",
    "12:30 pm",
    "½ cup, ¾ inch, ²³",
    "٣ arabic-indic three and ३ devanagari three",
    "①②③ circled digits",
    "Ⅻ roman numeral twelve",
    "１２３ full-width digits",
    "007",
]

CONTRACTIONS = [
    "it's a dog's life",
    "don't stop",
    "we're here",
    "they've gone",
    "I'm fine",
    "you'll see",
    "she'd know",
    "IT'S LOUD",
    "DON'T",
    "We'Re MiXeD",
    "'s 't 're 've 'm 'll 'd",
    "'sss 'tt 'ree",
    "rock 'n' roll",
    "o'clock",
    "the '90s",
    "it’s curly",
    "can''t",
    "y'all'd've",
]

ACCENTS = [
    "café",
    "crème brûlée",
    "naïve façade",
    "Zürich Straße",
    "São Paulo",
    "Ångström",
    "smørrebrød",
    "Łódź",
    "Dvořák",
    "Ærøskøbing",
    "fiancée's résumé",
    "e\u0301 combining acute",
    "n\u0303 combining tilde",
    "İstanbul",
    "Ǆ digraph and ǅ",
    "ﬁ ligature ﬂ",
    "Ⓐ circled letter",
    "\u0345 ypogegrammeni alone",
    "α\u0345 alpha with ypogegrammeni",
    "ΣΊΣΥΦΟΣ",
    "Ελληνικά γράμματα",
]

SCRIPTS = [
    "猫の写真",
    "一只猫的照片",
    "东京塔的夜景",
    "고양이 사진",
    "ひらがなとカタカナ",
    "ﾊﾝｶｸｶﾀｶﾅ half-width katakana",
    "漢字",
    "中文English混合",
    "صورة قطة",
    "مرحبا بالعالم",
    "שלום עולם",
    "фотография кошки",
    "Привет, мир!",
    "Ёжик в тумане",
    "बिल्ली की तस्वीर",
    "รูปแมว",
    "ქართული",
    "Հայերեն",
    "ሰላም",
    "ᚠᚢᚦᚨᚱᚲ runes",
    "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 math fraktur",
    "𝐛𝐨𝐥𝐝 math bold",
    "tiếng Việt có dấu",
    "Türkçe ığüşöç",
]

EMOJI = [
    "🐱",
    "a photo of a 🐶",
    "🔥🔥🔥",
    "I ❤️ NY",
    "❤",
    "👍🏽 thumbs up medium skin",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 rainbow flag",
    "🇫🇷 🇯🇵 🇺🇸 flags",
    "🇬🇧🇩🇪",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 scotland",
    "1️⃣ keycap",
    "☕ coffee",
    "sun ☀ and ☀️",
    "😀😃😄😁😆😅😂🤣",
    "🧑🏿‍🚀 astronaut",
    "🐈‍⬛ black cat",
    "emoji at end 🎉",
    "🎉 emoji at start",
    "mixed🙂text",
]

HTML_ENTITIES = [
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "it&#39;s",
    "it&#x27;s",
    "&quot;quoted&quot;",
    "fish &amp;amp; chips",
    "&amp;lt;tag&amp;gt;",
    "&amp;amp;amp; triple",
    "&nbsp;non-breaking&nbsp;",
    "caf&eacute;",
    "&copy; 2021 &reg; &trade;",
    "&hellip; &mdash; &ndash;",
    "&#128049; cat by number",
    "&unknown; entity",
    "AT&T",
    "<p>html <b>tags</b> here</p>",
    "a &lt; b &amp;&amp; c &gt; d",
    "&amp",
    "&#0;",
    # ftfy leaves entities alone in text that has angle brackets, so only the two html.unescape rounds act.
    "<b> &amp;amp; </b>",
    "<p>caf&amp;eacute; &amp;lt;3</p>",
    "<i>&amp;amp;amp; triple</i>",
    "x < y &amp;gt; z > w",
    "<a href='x'>it&amp;#39;s</a>",
]

MOJIBAKE = [
    "cafÃ©",
    "CafÃ© au lait",
    "Ã©tÃ©",
    "donâ€™t",
    "â€œquotedâ€\x9d",
    "ZÃ¼rich",
    "naÃ¯ve",
    "Ã\xa0 la carte",
    "æ—¥æœ¬èªž",
    "ÐŸÑ€Ð¸Ð²ÐµÑ‚",
    "Ã¢â‚¬â„¢ doubly encoded",
    "Ã",
]

WHITESPACE = [
    "",
    " ",
    "          ",
    "\t",
    "\n",
    "\r\n",
    "a\tb\tc",
    "line one\nline two\nline three",
    "windows\r\nline\r\nendings",
    "   leading and trailing   ",
    "many                                                  spaces",
    "tabs\t\t\t\tand\n\n\nnewlines",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    "thin\u2009space and en\u2002space",
    "line\u2028separator\u2029paragraph",
    "next\x85line",
    "vertical\x0btab\x0cfeed",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",
    "\ufeffbyte order mark",
    "soft\u00adhyphen",
]

ODD = [
    "null\x00byte",
    "bell\x07char",
    "escape \x1b[31mred\x1b[0m text",
    "\x7f delete",
    "c1 \x80\x81\x9f controls",
    "private use \ue000\uf8ff",
    "replacement \ufffd char",
    "noncharacter \ufdd0",
    "variation selector \ufe0f alone",
    "zwj\u200dalone",
    "rtl mark\u200f and lrm\u200e",
    "combining only \u0301\u0302\u0303",
    "lone \ud800 surrogate",
    "surrogate pair \ud83d\ude00",
    "<|startoftext|>",
    "<|endoftext|>",
    "a photo <|endoftext|> of a cat",
    "<|STARTOFTEXT|> upper special",
    "<|startoftext|><|endoftext|>",
    "<|endoftext",
    "</w>",
    "word</w>word",
]

MIXED_CASE = [
    "HELLO WORLD",
    "Hello World",
    "hElLo WoRlD",
    "iPhone 15 Pro Max",
    "NASA's JWST image",
    "McDonald's",
    "O'Reilly",
    "ÉCOLE",
    "ΣΣΣ final sigma",
    "Straße STRASSE",
    "ǈ titlecase",
    "ﬀ ligature upper ﬃ",
]


def long_strings() -> list[str]:
    """Strings over 77 tokens (and a few just at the limit), for truncation."""
    words = "the quick brown fox jumps over the lazy dog".split()
    return [
        " ".join(words * 10),
        " ".join(["cat"] * 75),
        " ".join(["cat"] * 76),
        "a " * 200,
        "🐱" * 40,
        "猫" * 100,
        "x" * 1000,
        ("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30).strip(),
        "\n".join(f"line {i}: café, naïve & more" for i in range(20)),
        "word " * 2000,
    ]


def random_strings(count: int, seed: int) -> list[str]:
    """Seeded strings drawn from many scripts, symbols and whitespace."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n  ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÎÕÜ",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГД",
        "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
        "的一是在不了有和人这中大为上个国我以要他",
        "あいうえおかきくけこアイウエオカキクケコ",
        "가나다라마바사아자차카타파하",
        "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
        "אבגדהוזחטיכלמנסעפצקרשת",
        "🐱🐶🦊🐻🐼🐨🐯🦁🐮🐷🍎🍕🚗✈️🌍❤️👍🏽👨‍👩‍👧🇫🇷",
        "&amp;&lt;&gt;&#39;&quot;",
        "\u0301\u0308\u200d\ufe0f\u00a0\u3000\u2028",
        "ÃƒÂ©â€™",
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(1, 60)
        chosen = rng.sample(pools, rng.randint(1, 4))
        out.append("".join(rng.choice(rng.choice(chosen)) for _ in range(length)))
    return out


def load_reference(clip_dir: Path) -> tuple[Any, Any]:
    """Return (SimpleTokenizer instance, clip.tokenize) from the wheel's files, without `import clip`."""
    spec = importlib.util.spec_from_file_location("reference_simple_tokenizer", clip_dir / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = module.SimpleTokenizer(bpe_path=str(clip_dir / "bpe_simple_vocab_16e6.txt.gz"))

    # clip.py's module level imports torchvision; only its `tokenize` function is needed, so run that
    # function's own source against the reference tokenizer.
    source = (clip_dir / "clip.py").read_text()
    tree = ast.parse(source)
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize")
    namespace: dict[str, Any] = {"torch": torch, "Union": typing.Union, "List": list, "_tokenizer": tokenizer}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(clip_dir / "clip.py"), "exec"), namespace)
    return tokenizer, namespace["tokenize"]


def main() -> None:
    """Generate the golden file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-dir", type=Path, required=True, help="the installed wheel's clip/ folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl (default: %(default)s)")
    args = parser.parse_args()

    reference, reference_tokenize = load_reference(args.clip_dir)
    texts = (
        PROMPTS + PUNCTUATION + NUMBERS + CONTRACTIONS + ACCENTS + SCRIPTS + EMOJI + HTML_ENTITIES + MOJIBAKE
        + WHITESPACE + ODD + MIXED_CASE + long_strings() + random_strings(RANDOM_STRINGS, RANDOM_SEED)
    )  # fmt: skip
    texts = list(dict.fromkeys(texts))  # keep order, drop duplicates

    vocab = (args.clip_dir / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    clip_version = version_of("clip-anytorch", args.clip_dir.parent)
    meta = {
        "kind": "meta",
        "reference": f"clip-anytorch {clip_version} clip/simple_tokenizer.py, clip/clip.py:tokenize",
        "ftfy": version_of("ftfy"),
        "regex": version_of("regex"),
        "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
        "generator": "benchmarks/make_tokenizer_golden.py",
    }
    records: list[dict[str, Any]] = [meta]
    records += [{"kind": "encode", "text": t, "ids": reference.encode(t)} for t in texts]
    for text in long_strings()[:4] + ["a photo of a cat"]:
        for length in TRUNCATE_LENGTHS:
            tokens = reference_tokenize(text, context_length=length, truncate=True)[0].tolist()
            records.append(
                {"kind": "tokenize", "text": text, "context_length": length, "truncate": True, "tokens": tokens}
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # ASCII escapes keep control characters and U+2028 from breaking the one-record-per-line layout.
    args.out.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records))
    n_tok = sum(r["kind"] == "tokenize" for r in records)
    print(f"wrote {len(texts)} encode and {n_tok} tokenize records to {args.out}")


def version_of(dist: str, site_dir: Path | None = None) -> str:
    """Version of a distribution installed here (or in `site_dir`), or 'unknown'."""
    found = importlib.metadata.distributions(name=dist, **({"path": [str(site_dir)]} if site_dir else {}))
    return next((d.version for d in found), "unknown")


if __name__ == "__main__":
    main()
