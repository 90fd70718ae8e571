"""Text for calibration and perplexity: an offline Wikipedia corpus, text files, WikiText directories.

The offline default is real Wikipedia: the ``gensim`` wheel ships an English Wikipedia XML excerpt
(about 100 articles) as test data. It is located, never imported (gensim pulls in scipy and more),
stripped of wiki markup, and split by article: every 5th article is the test split, the rest train,
so calibration text and evaluation text never overlap. Install it with ``pip install gensim==4.4.0``.

    python -m atom_tvm.datasets wikipedia -o data/     # writes data/wiki.train.txt, data/wiki.test.txt

Sources accepted by :func:`load_text`:

* ``"wikipedia"``: that split of the gensim excerpt;
* a text file: its whole content (the split does not apply to one file);
* a directory holding WikiText-2 or another corpus: ``*.txt``/``*.raw`` files, or (with pyarrow)
  parquet files or a ``datasets`` ``save_to_disk`` directory (``*.arrow``) with a ``text`` column.
  Files whose path names the split (``wiki.test.raw``, ``test-00000-of-00001.parquet``, ``test/``)
  are preferred; with none, every file is read.
"""

from __future__ import annotations

import argparse
import bz2
import functools
import html
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import numpy as np

from atom_tvm.errors import UserError, run_command
from atom_tvm.staging import atomic_output

WIKIPEDIA = "wikipedia"
SPLITS = ("train", "test")
TEST_EVERY = 5  # article i goes to the test split when i % TEST_EVERY == TEST_EVERY - 1
GENSIM_FIX = "pip install gensim==4.4.0"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEXT_SUFFIXES = (".txt", ".raw")
TABLE_SUFFIXES = (".parquet", ".arrow")

# Sections that are lists of links and citations rather than prose; the article ends there.
_TRAILING_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                      "bibliography", "sources", "footnotes", "citations"}
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# <ref>...</ref> and <ref name=x/>; the content is a citation, not prose.
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
# Tags whose content is not prose either (formulas, galleries, code listings, timelines).
_DROP_BLOCKS = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap)\b[^>]*>.*?</\1>",
                          re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_NAMESPACED = re.compile(r"^\s*:?\s*([A-Za-z -]+):")
_KEEP_NAMESPACES = {"w", "wikipedia", "wikt", "wiktionary"}  # links into these still read as words
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every ``open_ ... close`` span, nested ones included, by counting depth.

    A scanner rather than an innermost-first regex because spans may hold single braces (a
    template listing the ASCII characters holds "{|}~"). A stray ``close`` stays; an unclosed
    span runs to the end of the text.
    """
    pieces, depth, kept_from = [], 0, 0
    for m in re.finditer(f"{re.escape(open_)}|{re.escape(close)}", text):
        if m.group() == open_:
            if depth == 0:
                pieces.append(text[kept_from:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                kept_from = m.end()
    if depth == 0:
        pieces.append(text[kept_from:])
    return "".join(pieces)


def _link_text(inner: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories and interwiki links vanish."""
    parts = inner.split("|")
    namespace = _NAMESPACED.match(parts[0])
    if namespace and namespace.group(1).strip().lower() not in _KEEP_NAMESPACES:
        return ""
    return parts[-1] if len(parts) > 1 else parts[0].lstrip(":")


def _links_to_text(text: str) -> str:
    """Replace every [[...]] by its text, innermost first (a file caption may hold links and
    single brackets); a stray ``]]`` stays and an unclosed ``[[`` is kept as text."""
    levels: list[list[str]] = [[]]
    kept_from = 0
    for m in re.finditer(r"\[\[|\]\]", text):
        levels[-1].append(text[kept_from:m.start()])
        kept_from = m.end()
        if m.group() == "[[":
            levels.append([])
        elif len(levels) > 1:
            inner = "".join(levels.pop())
            levels[-1].append(_link_text(inner))
        else:
            levels[-1].append(m.group())
    levels[-1].append(text[kept_from:])
    while len(levels) > 1:
        inner = "".join(levels.pop())
        levels[-1].append("[[" + inner)
    return "".join(levels[0])


def wiki_to_text(markup: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs and headings, one per line."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _links_to_text(text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", _EMPHASIS.sub("", text))
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for raw in text.splitlines():
        line = _LIST_MARKER.sub("", raw.strip())
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).lower() in _TRAILING_SECTIONS:
                break
            line = heading.group(2)
        # Leftovers of broken markup (a stray table row, an unclosed template) are not prose.
        if line and not line.startswith(("|", "!", "{", "}")):
            lines.append(re.sub(r"\s{2,}", " ", line))
    return "\n".join(lines)


def wikipedia_dump() -> Path:
    """The enwiki excerpt inside the installed gensim wheel (located via find_spec, not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the offline Wikipedia corpus comes with gensim's test data; run: {GENSIM_FIX}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "test" / "test_data" / WIKI_DUMP
        if path.is_file():
            return path
    raise UserError(f"the installed gensim lacks test_data/{WIKI_DUMP}; run: {GENSIM_FIX}")


def iter_wiki_articles(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace, non-redirect page of a MediaWiki XML dump (bz2)."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            text = elem.find("./{*}revision/{*}text")
            if fields["ns"].text == "0" and "redirect" not in fields and text is not None and text.text:
                yield fields["title"].text, text.text
            elem.clear()  # the dump is streamed: drop each page once read


@functools.lru_cache(maxsize=1)
def wikipedia_splits() -> dict[str, str]:
    """{"train": text, "test": text}: plain-text articles, each headed by its title, split by article."""
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i, (title, markup) in enumerate(iter_wiki_articles(wikipedia_dump())):
        body = wiki_to_text(markup)
        if body:
            split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
            parts[split].append(f"{title}\n{body}\n")
    return {split: "\n".join(articles) for split, articles in parts.items()}


def _read_table_texts(path: Path) -> list[str]:
    """The ``text`` column of a parquet file or a ``datasets`` arrow file (needs pyarrow)."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix} files needs pyarrow (pip install pyarrow); "
                        "or pass a directory of .txt/.raw files") from None
    try:
        if path.suffix == ".parquet":
            table = pyarrow.parquet.read_table(path, columns=None)
        else:  # datasets writes Arrow IPC streams; older versions wrote the file format
            try:
                table = pyarrow.ipc.open_stream(path).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_file(path).read_all()
    except (OSError, pyarrow.ArrowException) as err:
        raise UserError(f"{path}: not a readable {path.suffix} file ({err})") from None
    if "text" not in table.column_names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if t is not None]


def _split_files(directory: Path, split: str) -> list[Path]:
    """Data files under ``directory``, restricted to those naming ``split`` when any do."""
    files = sorted(p for p in directory.rglob("*")
                   if p.is_file() and p.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES)
    if not files:
        raise UserError(f"{directory}: no .txt, .raw, .parquet or .arrow files; pass a text file, "
                        f"'{WIKIPEDIA}', or a WikiText directory")
    named = [p for p in files if re.search(rf"(^|[^a-z]){split}([^a-z]|$)", str(p.relative_to(directory)).lower())]
    return named or files


def _read_directory(directory: Path, split: str) -> str:
    rows: list[str] = []
    for path in _split_files(directory, split):
        if path.suffix in TEXT_SUFFIXES:
            rows.append(path.read_text(encoding="utf-8"))
        else:
            # WikiText rows are lines that keep their "\n"; rows without one are separate paragraphs.
            rows.extend(r if r.endswith("\n") else r + "\n" for r in _read_table_texts(path))
    return "".join(rows)


def load_text(source: str | Path, split: str = "test") -> str:
    """The text of ``source``: "wikipedia", a text file, or a corpus directory (see the module doc)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if str(source) == WIKIPEDIA:
        text, where = wikipedia_splits()[split], f"{WIKIPEDIA} ({split} split)"
    else:
        path = Path(source)
        if path.is_dir():
            text, where = _read_directory(path, split), str(path)
        elif path.is_file():
            try:
                text, where = path.read_text(encoding="utf-8"), str(path)
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        else:
            raise UserError(f"{path}: no such file or directory; pass a text file, '{WIKIPEDIA}', "
                            "or a WikiText directory")
    if not text.strip():
        raise UserError(f"{where}: no text in it")
    return text


def calibration_source(source: str | Path) -> tuple[str, str]:
    """(source, split) of the calibration text that goes with evaluation text ``source``.

    Corpora with splits calibrate on their train split. A lone ``*test*`` file pairs with its
    ``*train*`` sibling (data/wiki.test.txt -> data/wiki.train.txt, wiki.test.raw -> wiki.train.raw);
    any other file has no disjoint calibration text, and calibrating on the evaluation text itself
    would flatter the result, so that is an error.
    """
    path = Path(source)
    if str(source) == WIKIPEDIA or path.is_dir():
        return str(source), "train"
    sibling = path.with_name(path.name.replace("test", "train"))
    if sibling != path and sibling.is_file():
        return str(sibling), "train"
    raise UserError(f"{source}: no calibration text goes with it (no '{sibling.name}' beside it); "
                    "pass --calib-text")


def encode(tokenizer_json: Path, text: str) -> np.ndarray:
    """Token ids (int64) of ``text`` with the model's tokenizer, without special tokens."""
    from tokenizers import Tokenizer

    if not Path(tokenizer_json).is_file():
        raise UserError(f"{tokenizer_json}: missing; the model directory needs a tokenizer.json")
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int64)


def token_windows(ids: np.ndarray, length: int, count: int | None = None, seed: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, length] of ``ids``: the first ``count`` (all when None), or with
    ``seed`` ``count`` windows drawn at random (sorted). A text too short for one window is a UserError."""
    if length < 2:
        raise UserError(f"window length {length}: needs at least 2 tokens")
    available = len(ids) // length
    if available == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {length}; "
                        "use a longer text or a shorter window")
    windows = ids[:available * length].reshape(available, length)
    if count is None or count >= available:
        return windows
    if seed is None:
        return windows[:count]
    return windows[np.sort(np.random.default_rng(seed).choice(available, count, replace=False))]


def held_out_windows(model_dir: str | Path, text: str | Path, length: int, count: int | None = None) -> np.ndarray:
    """The first ``count`` windows of ``length`` tokens of ``text``'s test split (a plain file is read
    whole), tokenized by ``model_dir``'s tokenizer: what perplexity is measured on."""
    return token_windows(encode(Path(model_dir) / "tokenizer.json", load_text(text, "test")), length, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atom_tvm.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("source", choices=[WIKIPEDIA], help="corpus to export")
    parser.add_argument("-o", "--output", type=Path, required=True, help="directory for wiki.{train,test}.txt")
    args = parser.parse_args(argv)

    def export():
        if args.output.exists() and not args.output.is_dir():
            raise UserError(f"{args.output}: exists and is not a directory; choose another -o")
        texts = {split: load_text(args.source, split) for split in SPLITS}
        for split, text in texts.items():
            with atomic_output(args.output / f"wiki.{split}.txt") as tmp:
                tmp.write_text(text, encoding="utf-8")
            print(f"{args.output / f'wiki.{split}.txt'}: {len(text.split()):,} words")

    return run_command(export)

if __name__ == "__main__":
    sys.exit(main())
