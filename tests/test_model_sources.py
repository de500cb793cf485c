"""Model sources a user already has: sharded safetensors and .bin checkpoints, hub-cache
directories (``models--ORG--NAME``, ``refs/main`` or ``--revision``), repo ids resolved from
the local Hugging Face cache offline, and the errors when nothing is found. Every model is a
tiny random GPT-NeoX written by the test in that layout and must give transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch

from fastdecode.cli import main
from fastdecode.errors import ModelLoadError
from fastdecode.models import gguf_cache, hub, load_model, weights
from fastdecode.reference.streaming import dense_logits

transformers = pytest.importorskip("transformers")
TOKENS = torch.tensor([3, 17, 5, 88, 41, 2, 9, 60])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from safetensors.torch import load_file

    cfg = transformers.GPTNeoXConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, rotary_pct=0.5, tie_word_embeddings=False,
        max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        ref = model(TOKENS[None]).logits[0]
    saved = tmp_path_factory.mktemp("hf")
    model.save_pretrained(saved)  # the names a checkpoint on disk has
    state = load_file(str(saved / "model.safetensors"))
    return json.loads((saved / "config.json").read_text()), state, ref


def write_model(folder, hf, layout: str):
    """``layout``: single, safetensors-shards, bin-shards."""
    from safetensors.torch import save_file

    cfg, state, _ = hf
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if layout == "single":
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    parts = [names[i::3] for i in range(3)]  # every shard holds some of every layer
    ext = "safetensors" if layout == "safetensors-shards" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"{stem}-{i + 1:05d}-of-00003.{ext}"
        shard = {k: state[k] for k in part}
        if ext == "safetensors":
            save_file(shard, str(folder / fname))
        else:
            torch.save(shard, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def assert_matches(lm, hf):
    ours = dense_logits(lm.model, TOKENS)
    ref = hf[2]
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("layout", ["safetensors-shards", "bin-shards"])
def test_sharded_checkpoints_load_every_shard(hf, tmp_path, layout):
    lm = load_model(str(write_model(tmp_path / "m", hf, layout)))
    assert lm.spec.num_layers == 3
    assert_matches(lm, hf)


def test_a_missing_shard_is_named(hf, tmp_path):
    folder = write_model(tmp_path / "m", hf, "safetensors-shards")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"names 3 shards; missing .*00002-of-00003"):
        load_model(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a valid shard index"):
        load_model(str(folder))


def hub_repo(root, hf, repo="EleutherAI/pythia-tiny", commits=("a" * 40,), main=None):
    """A hub-cache repo laid out as huggingface_hub writes it: blobs, snapshots of links."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True)
    for c in commits:
        src = write_model(tmp := root / f"tmp-{c[:6]}", hf, "safetensors-shards")
        snap = repo_dir / "snapshots" / c
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = blobs / f"{c[:6]}-{f.name}"
            f.rename(blob)
            (snap / f.name).symlink_to(blob)
        tmp.rmdir()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(main or commits[-1])
    return repo_dir


def test_hub_cache_dir_follows_refs_main_or_a_revision(hf, tmp_path):
    c1, c2 = "1" * 40, "2" * 40
    repo_dir = hub_repo(tmp_path, hf, commits=(c1, c2), main=c2)
    lm = load_model(str(repo_dir))
    assert lm.source == f"EleutherAI/pythia-tiny@{c2}"
    assert_matches(lm, hf)
    assert load_model(str(repo_dir), revision=c1[:8]).source.endswith(c1)
    with pytest.raises(ModelLoadError, match="no snapshot for revision 'v9'.*refs: main"):
        load_model(str(repo_dir), revision="v9")
    (repo_dir / "refs" / "main").write_text("f" * 40)
    with pytest.raises(ModelLoadError, match="points at commit f+, which has no snapshot"):
        load_model(str(repo_dir))


def test_repo_id_from_the_local_cache_offline(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub_repo(tmp_path / "home" / "hub", hf)
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    assert_matches(load_model("EleutherAI/pythia-tiny"), hf)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelLoadError, match=r"has no models--EleutherAI--pythia-2\.8b in "
                                             r".*elsewhere .*nothing is downloaded"):
        load_model("EleutherAI/pythia-2.8b")
    with pytest.raises(ModelLoadError, match="--revision applies to a hub-cache model"):
        load_model("tiny-neox", revision="main")


def test_the_cli_takes_a_hub_cache_dir(hf, tmp_path, capsys):
    """The issue's first report: a command on models--ORG--NAME said 'has no config.json'."""
    repo_dir = hub_repo(tmp_path, hf)
    rc = main(["bench", "--model", str(repo_dir), "--device", "cpu", "--compile", "none",
               "--policy", "streaming", "--sink", "2", "--window", "8", "--prompt-len", "12",
               "--decode-len", "4", "--warmup-tokens", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "EleutherAI/pythia-tiny@" in out.out


def test_gguf_loads_are_cached_and_identical(tmp_path):
    """The GGUF read (tens of seconds on a small CPU) is cached as safetensors + spec JSON;
    a cached load gives the same spec, tensors and tokenizer as a read of the file."""
    path = weights.smollm2_gguf_path()
    spec, state, tok = gguf_cache.load_gguf(path)  # writes the cache if it was not there
    cached = weights._cache_dir() / f"gguf-{gguf_cache._file_key(path)}"
    assert cached.with_suffix(".json").is_file() and cached.with_suffix(".safetensors").is_file()
    spec2, state2, tok2 = gguf_cache.load_gguf(path)
    assert spec2 == spec and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert tok2.encode("attention sinks") == tok.encode("attention sinks")
