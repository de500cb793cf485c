"""Text sources: named copies under data/, local files, HF datasets, and their errors."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from fastdecode.errors import FastdecodeError, InputError
from fastdecode.eval import data as d


def need(module: str):
    """The module, or a skip; in CI (``CI`` set) a hard import: ``datasets`` is in the test
    extras, so a skip there would hide that these sources are never exercised."""
    return importlib.import_module(module) if os.environ.get("CI") else \
        pytest.importorskip(module)


class CharTokenizer:
    """One token per character (enough to test lengths and BOS)."""

    bos_token_id = 0

    def encode(self, text):
        return [ord(c) % 1000 + 1 for c in text]


def test_named_sources_resolve_in_the_repo():
    for name in ("wikitext-2", "pg19-10146", "pg19-10321"):
        src = d.load_text(name)
        assert src.kind == "named" and len(src.text) > 100_000
        assert src.describe()["sha256"]
    assert d.load_text("wikitext-2").path.endswith("wikitext-2-raw/wiki.test.raw")


def test_fastdecode_data_comes_first(tmp_path, monkeypatch):
    (tmp_path / "pg19").mkdir()
    (tmp_path / "pg19" / "10146.txt").write_text("a private copy\n")
    monkeypatch.setenv("FASTDECODE_DATA", str(tmp_path))
    assert d.data_dirs()[0] == tmp_path
    src = d.load_text("pg19-10146")
    assert src.text == "a private copy\n" and src.path.startswith(str(tmp_path))
    # a name missing there falls through to the repo's copy
    assert d.load_text("wikitext-2").path != str(tmp_path)


def test_missing_named_file_lists_where_it_looked(monkeypatch, tmp_path):
    with pytest.raises(d.DataSourceError, match=r"pg19/99999\.txt not found; looked in"):
        d.load_text("pg19-99999")


@pytest.mark.parametrize("source,msg", [
    ("no-such-corpus", "unknown data source 'no-such-corpus'"),
    ("missing/book.txt", "does not exist"),
    ("", "no data source"),
])
def test_bad_sources_are_clear_errors(source, msg):
    with pytest.raises(d.DataSourceError, match=msg) as e:
        d.load_text(source)
    assert isinstance(e.value, InputError) and isinstance(e.value, FastdecodeError)


def test_local_text_file_and_lengths(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world")
    src = d.load_text(str(p))
    assert src.kind == "text" and src.text == "hello world"
    ids = d.tokenize(src, CharTokenizer())
    assert len(ids) == 11
    assert d.tokenize(src, CharTokenizer(), bos=True)[0] == 0
    assert len(d.take_tokens(ids, 10, "t.txt")) == 11  # 10 scored need 11
    with pytest.raises(d.DataSourceError, match="only 11 tokens; scoring 11 needs 12"):
        d.take_tokens(ids, 11, "t.txt")
    with pytest.raises(InputError, match=">= 1"):
        d.take_tokens(ids, 0, "t.txt")


def test_empty_and_binary_files(tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(d.DataSourceError, match="is empty"):
        d.load_text(str(tmp_path / "e.txt"))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(d.DataSourceError, match="not UTF-8"):
        d.load_text(str(tmp_path / "b.txt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(d.DataSourceError, match="not a dataset saved"):
        d.load_text(str(tmp_path / "dir"))


def test_no_tokenizer_is_a_clear_error(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abc")
    with pytest.raises(InputError, match="no tokenizer"):
        d.tokenize(d.load_text(str(p)), None)


def test_datasets_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(d.DataSourceError, match="optional package `datasets`"):
        d.load_text(str(p))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    with pytest.raises(d.DataSourceError, match="optional package `datasets`"):
        d.load_text(str(saved))


def test_hf_dataset_on_disk_and_parquet(tmp_path):
    datasets = need("datasets")
    pa = need("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first row", "", "second row"], "other": [1, 2, 3]}),
                   str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"text": ["x"], "other": [0]}), str(tmp_path / "train.parquet"))
    src = d.load_text(str(tmp_path / "t.parquet"))
    assert src.text == "first row\n\n\n\nsecond row" and src.details["rows"] == 3
    dd = datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "t.parquet"),
                                                      "train": str(tmp_path / "train.parquet")})
    dd.save_to_disk(str(tmp_path / "dd"))
    got = d.load_text(str(tmp_path / "dd"))
    assert got.text == src.text and got.details["split"] == "test"
    assert d.load_text(str(tmp_path / "dd"), split="train").text == "x"
    with pytest.raises(d.DataSourceError, match="no split 'dev'"):
        d.load_text(str(tmp_path / "dd"), split="dev")
    with pytest.raises(d.DataSourceError, match="no column 'body'"):
        d.load_text(str(tmp_path / "dd"), text_column="body")
    with pytest.raises(d.DataSourceError, match="does not hold text"):
        d.load_text(str(tmp_path / "dd"), text_column="other")
    dd["test"].save_to_disk(str(tmp_path / "one"))  # a single Dataset, not a DatasetDict
    assert d.load_text(str(tmp_path / "one")).text == src.text
    arrow = next((tmp_path / "one").glob("*.arrow"))  # an .arrow file on its own
    assert d.load_text(str(arrow)).text == src.text


def cache_dataset(cache, name: str, config: str, splits: dict):
    """Write ``splits`` into a datasets cache as a download from the hub leaves them
    (``<cache>/<name>/<config>/<version>/<commit>/``), without the network."""
    need("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        f = cache.parent / f"{name}-{split}.parquet"
        pq.write_table(pa.table({"text": rows}), str(f))
        files[split] = [str(f)]
    build = cache.parent / "build"
    builder = Parquet(cache_dir=str(build), dataset_name=name, config_name=config,
                      data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    target = cache / name / config / "0.0.0" / ("c0ffee" * 6)
    target.parent.mkdir(parents=True)
    Path(builder.cache_dir).rename(target)


def test_dataset_by_name_from_the_local_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cache_dataset(tmp_path / "cache", "wikitext", "wikitext-2-raw-v1",
                  {"test": [" = Valkyria = ", "", " The game began ."], "train": ["t"]})
    assert d.datasets_cache_dir() == tmp_path / "cache"
    src = d.load_text("wikitext:wikitext-2-raw-v1:test")
    assert src.text == " = Valkyria = \n\n\n\n The game began ."
    assert src.details == {"dataset": "wikitext", "config": "wikitext-2-raw-v1",
                           "split": "test", "text_column": "text", "rows": 3}
    assert d.load_text("wikitext:wikitext-2-raw-v1", split="train").text == "t"
    with pytest.raises(d.DataSourceError, match="names split 'test', --split says 'train'"):
        d.load_text("wikitext:wikitext-2-raw-v1:test", split="train")
    with pytest.raises(d.DataSourceError, match=r"'pg19' \(config 'default'\) is not in the "
                                                r"local datasets cache .*nothing is downloaded"):
        d.load_text("pg19::test")
    with pytest.raises(d.DataSourceError, match="config 'wikitext-103-raw-v1'"):
        d.load_text("wikitext:wikitext-103-raw-v1:test")
