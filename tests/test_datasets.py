"""atom_tvm.datasets: wiki markup stripping, the offline Wikipedia splits, corpus directories, windows."""

from __future__ import annotations

import importlib.util
import stat

import numpy as np
import pytest

from atom_tvm import datasets
from atom_tvm.datasets import calibration_source, load_text, token_windows, wiki_to_text
from atom_tvm.errors import UserError
from atom_tvm.staging import umask
from cli import assert_user_error, run_module

MARKUP = """{{Infobox country|name=Ruritania|capital={{nowrap|Strelsau}}}}
'''Ruritania''' is a [[fiction]]al [[country|kingdom]] in [[Central Europe]].<ref name="h">Hope, 1894.</ref>
[[File:Flag.svg|thumb|The flag of [[Ruritania]] in 1894]]<!-- hidden note -->
== History ==
The kingdom was described by<ref>Hope</ref> [http://example.org Anthony Hope] in <i>1894</i>.&nbsp;It lasted.
{| class="wikitable"
| a || b {{small|c}}
|}
* A list item with a [[w:Link|wiki link]].
<math>x^2</math>
== References ==
{{reflist}}
Nothing after the references is prose.
[[Category:Fictional countries]]"""


def test_wiki_markup_becomes_prose():
    assert wiki_to_text(MARKUP).splitlines() == [
        "Ruritania is a fictional kingdom in Central Europe.",
        "History",
        "The kingdom was described by Anthony Hope in 1894. It lasted.",
        "A list item with a wiki link.",
    ]


def test_wikipedia_splits_are_disjoint_clean_and_deterministic():
    splits = datasets.wikipedia_splits()
    articles = list(datasets.iter_wiki_articles(datasets.wikipedia_dump()))
    test_titles = {t for i, (t, _) in enumerate(articles) if i % datasets.TEST_EVERY == datasets.TEST_EVERY - 1}
    assert 80 < len(articles) < 200
    assert len(splits["test"].split()) > 50_000 and len(splits["train"].split()) > 4 * 50_000
    train_heads = {a.split("\n", 1)[0] for a in splits["train"].split("\n\n")}
    test_heads = {a.split("\n", 1)[0] for a in splits["test"].split("\n\n")}
    assert test_titles & test_heads and not test_titles & train_heads
    for text in splits.values():
        for leftover in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&nbsp;", "'''"):
            assert leftover not in text, leftover


def test_cli_writes_both_splits_atomically(tmp_path):
    out = tmp_path / "data"
    proc = run_module("atom_tvm.datasets", "wikipedia", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["wiki.test.txt", "wiki.train.txt"]  # no temp files left
    for split in datasets.SPLITS:
        path = out / f"wiki.{split}.txt"
        assert path.read_text(encoding="utf-8") == load_text("wikipedia", split)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o666 & ~umask()
    # The exported test file pairs with its train sibling for calibration.
    assert calibration_source(out / "wiki.test.txt") == (str(out / "wiki.train.txt"), "train")


def test_cli_refuses_a_file_as_output_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_user_error(run_module("atom_tvm.datasets", "wikipedia", "-o", tmp_path / "f"), "not a directory")


def test_text_file_and_its_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert load_text(f) == "hello world\n"
    with pytest.raises(UserError, match="no such file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")
    with pytest.raises(UserError, match="--calib-text"):
        calibration_source(f)


def test_wikitext_raw_directory_picks_the_split(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.raw").write_text(f" = {split} = \n text of {split}\n")
    assert load_text(tmp_path, "test") == " = test = \n text of test\n"
    assert load_text(tmp_path, "train") == " = train = \n text of train\n"
    assert calibration_source(tmp_path) == (str(tmp_path), "train")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    with pytest.raises(UserError, match="no .txt, .raw, .parquet"):
        load_text(tmp_path / "other")


def test_parquet_and_saved_dataset_directories(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet

    rows = {"train": [" = A = \n", "", " alpha beta\n"], "test": [" = B = \n", " gamma\n"]}
    hub = tmp_path / "hub" / "wikitext-2-raw-v1"
    hub.mkdir(parents=True)
    for split, texts in rows.items():
        pyarrow.parquet.write_table(pa.table({"text": texts}), hub / f"{split}-00000-of-00001.parquet")
    assert load_text(tmp_path / "hub", "test") == " = B = \n gamma\n"
    # save_to_disk layout: one directory per split holding Arrow IPC stream files.
    saved = tmp_path / "saved"
    for split, texts in rows.items():
        (saved / split).mkdir(parents=True)
        table = pa.table({"text": texts})
        with pyarrow.ipc.new_stream(str(saved / split / "data-00000-of-00001.arrow"), table.schema) as w:
            w.write_table(table)
    assert load_text(saved, "train") == " = A = \n\n alpha beta\n"
    bad = tmp_path / "bad"
    bad.mkdir()
    pyarrow.parquet.write_table(pa.table({"content": ["x"]}), bad / "test.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        load_text(bad)


def test_missing_gensim_is_a_user_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install gensim"):
        datasets.wikipedia_dump()


def test_token_windows():
    ids = np.arange(100)
    assert token_windows(ids, 30).tolist() == [list(range(0, 30)), list(range(30, 60)), list(range(60, 90))]
    assert token_windows(ids, 30, 2).shape == (2, 30)
    picked = token_windows(ids, 10, 4, seed=0)
    assert picked.shape == (4, 10) and (picked[:, 0] % 10 == 0).all() and np.all(np.diff(picked[:, 0]) > 0)
    assert np.array_equal(picked, token_windows(ids, 10, 4, seed=0))
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows(ids, 101)
