"""Text sources for perplexity: named copies under ``data/``, local text and dataset files,
datasets in the local cache; what a source string may be and where ``data/`` is looked up:
docs/ppl.md#text-sources---data."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastdecodeError, InputError
from ..models.hub import hf_cache


class DataSourceError(InputError):
    """A text source is unknown, missing, unreadable or too short."""


# name -> path relative to the data directory
NAMED_SOURCES = {
    "wikitext-2": "wikitext-2-raw/wiki.test.raw",
    "wikitext-2-raw": "wikitext-2-raw/wiki.test.raw",
    "pg19-10146": "pg19/10146.txt",
    "pg19-10321": "pg19/10321.txt",
}
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json",
                    ".json": "json", ".csv": "csv"}
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/fastdecode/eval/data.py -> repo


def data_dirs() -> list[Path]:
    """Candidate data directories, in the order they are searched."""
    out = []
    env = os.environ.get("FASTDECODE_DATA")
    if env:
        out.append(Path(env).expanduser())
    out += [_REPO_ROOT / "data", _REPO_ROOT.parent / "shared" / "data", Path.cwd() / "data"]
    seen, uniq = set(), []
    for d in out:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            uniq.append(d)
    return uniq


def find_data_file(relative: str) -> Path:
    """The first ``<data dir>/<relative>`` that exists (see :func:`data_dirs`)."""
    tried = []
    for d in data_dirs():
        p = d / relative
        if p.is_file():
            return p
        tried.append(str(p))
    raise DataSourceError(f"data file {relative} not found; looked in: {', '.join(tried)} "
                          "(set FASTDECODE_DATA to a directory laid out like data/)")


def _named_path(name: str) -> str | None:
    if name in NAMED_SOURCES:
        return NAMED_SOURCES[name]
    if name.startswith("pg19-") and name[5:].isdigit():
        return f"pg19/{name[5:]}.txt"
    return None


def known_names() -> list[str]:
    return [n for n in NAMED_SOURCES if n != "wikitext-2-raw"]


@dataclass
class TextSource:
    """A resolved source: its text and where it came from."""

    name: str  # what the user asked for
    path: str  # the file or directory read
    kind: str  # "named" | "text" | "dataset"
    text: str
    details: dict = field(default_factory=dict)

    def describe(self) -> dict:
        raw = self.text.encode("utf-8")
        return {"source": self.name, "path": self.path, "kind": self.kind,
                "chars": len(self.text), "sha256": hashlib.sha256(raw).hexdigest(),
                **self.details}


def load_text(source: str, *, text_column: str = "text", split: str | None = None) -> TextSource:
    """Resolve ``source`` (see the module doc) and read its text."""
    if not source or not str(source).strip():
        raise DataSourceError("no data source given")
    source = str(source)
    rel = _named_path(source)
    if rel is not None:
        path = find_data_file(rel)
        return TextSource(source, str(path), "named", _read_text(path))
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_dataset_dir(source, path, text_column, split)
    if path.is_file():
        kind = DATASET_SUFFIXES.get(path.suffix.lower())
        if kind is not None:
            return _load_dataset_file(source, path, kind, text_column, split)
        return TextSource(source, str(path), "text", _read_text(path))
    if _HUB_NAME.match(source) and ":" in source:
        return _load_cached_dataset(source, text_column, split)
    looks_like_path = os.sep in source or "." in Path(source).name
    if looks_like_path:
        raise DataSourceError(f"data file {source} does not exist")
    raise DataSourceError(f"unknown data source {source!r}: not an existing file or "
                          f"directory, not one of {', '.join(known_names())} (or pg19-<id>), "
                          "and not NAME:CONFIG:SPLIT of a dataset in the local datasets cache")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except OSError as e:
        raise DataSourceError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise DataSourceError(f"{path} is empty")
    return text


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataSourceError("reading Hugging Face datasets, parquet or arrow files needs the "
                              "optional package `datasets` (pip install datasets); plain "
                              "text files and the named sources do not") from None
    return datasets


def _pick_split(ds, split: str | None, where: str):
    """A Dataset from a Dataset or DatasetDict (``split``; else 'test', else the only one)."""
    if hasattr(ds, "column_names") and not isinstance(ds.column_names, dict):
        if split not in (None, "train", getattr(ds, "split", None)):
            raise DataSourceError(f"{where} holds a single split; --split {split} does not apply")
        return ds, getattr(ds, "split", None)
    splits = list(ds.keys())
    if split is None:
        if "test" in splits:
            split = "test"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataSourceError(f"{where} has splits {splits}; choose one with --split")
    if split not in splits:
        raise DataSourceError(f"{where} has no split {split!r}; it has {splits}")
    return ds[split], split


def _join_rows(ds, column: str, where: str) -> str:
    cols = ds.column_names
    if column not in cols:
        raise DataSourceError(f"{where} has no column {column!r}; columns: {cols} "
                              "(choose one with --text-column)")
    rows = ds[column]
    if rows and not isinstance(rows[0], str):
        raise DataSourceError(f"column {column!r} of {where} does not hold text")
    text = "\n\n".join(rows)
    if not text.strip():
        raise DataSourceError(f"column {column!r} of {where} is empty")
    return text


def _load_dataset_dir(source: str, path: Path, column: str, split: str | None) -> TextSource:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers) and not any(
            (sub / m).exists() for sub in path.iterdir() if sub.is_dir() for m in markers):
        raise DataSourceError(f"{path} is a directory but not a dataset saved with "
                              "datasets' save_to_disk (no dataset_info.json / state.json / "
                              "dataset_dict.json)")
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a bad directory
        raise DataSourceError(f"cannot load the dataset saved in {path}: {e}") from None
    ds, split = _pick_split(ds, split, str(path))
    return TextSource(source, str(path), "dataset", _join_rows(ds, column, str(path)),
                      {"split": split, "text_column": column, "rows": len(ds)})


_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]*){0,2}$")


def datasets_cache_dir() -> Path:
    """Where ``datasets`` keeps what it prepared (its own order of variables)."""
    return hf_cache("datasets", "HF_DATASETS_CACHE")


def _load_cached_dataset(source: str, column: str, split: str | None) -> TextSource:
    name, config, in_source = (source.split(":") + ["", ""])[:3]
    if split and in_source and split != in_source:
        raise DataSourceError(f"{source} names split {in_source!r}, --split says {split!r}")
    split = in_source or split or None
    datasets = _datasets()
    import huggingface_hub.constants as hub

    cache = datasets_cache_dir()
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True  # never the network
    try:
        ds = datasets.load_dataset(name, config or None, cache_dir=str(cache))
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, FileNotFoundError
        raise DataSourceError(f"dataset {name!r} (config {config or 'default'!r}) is not in "
                              f"the local datasets cache {cache} (offline: nothing is "
                              f"downloaded): {str(e).splitlines()[0][:300]}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
    ds, split = _pick_split(ds, split, source)
    return TextSource(source, str(cache), "dataset", _join_rows(ds, column, source),
                      {"dataset": name, "config": config or None, "split": split,
                       "text_column": column, "rows": len(ds)})


def _load_dataset_file(source: str, path: Path, builder: str, column: str,
                       split: str | None) -> TextSource:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data")
    except Exception as e:
        raise DataSourceError(f"cannot read {path} as {builder}: {e}") from None
    if split is not None:
        raise DataSourceError(f"{path} is a single file; --split does not apply")
    return TextSource(source, str(path), "dataset", _join_rows(ds, column, str(path)),
                      {"format": builder, "text_column": column, "rows": len(ds)})


def tokenize(src: TextSource, tokenizer, *, bos: bool = False) -> list[int]:
    """Token ids of ``src.text`` with the model's tokenizer (no special tokens)."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer, so it cannot read text; give a model "
                         "with one (a HF directory, a GGUF file, smollm2-135m, or a "
                         "GPT-NeoX-shaped preset)")
    ids = list(tokenizer.encode(src.text))
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise InputError("--bos: the tokenizer has no BOS token")
        ids = [bos_id] + ids
    return ids


def take_tokens(ids: list[int], n_scored: int, what: str) -> list[int]:
    """The first ``n_scored + 1`` ids (``n_scored`` fed, each scored on the next one)."""
    if n_scored < 1:
        raise InputError(f"--max-tokens must be >= 1 (tokens scored), got {n_scored}")
    if len(ids) < n_scored + 1:
        raise DataSourceError(f"{what} has only {len(ids)} tokens; scoring {n_scored} needs "
                              f"{n_scored + 1} (lower --max-tokens or use a longer text)")
    return ids[:n_scored + 1]


__all__ = ["DataSourceError", "TextSource", "data_dirs", "find_data_file", "load_text",
           "tokenize", "take_tokens", "known_names", "NAMED_SOURCES", "FastdecodeError"]
