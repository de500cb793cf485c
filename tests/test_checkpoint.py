"""Quantized checkpoints verify themselves: the manifest (size + SHA-256 of each file), the
tensors against the marker's spec and recipe, and a directory written beside its target
and renamed into place."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdecode.errors import ModelLoadError, OutputError
from fastdecode.models import load_model
from fastdecode.quant import QuantConfig, quantize_model
from fastdecode.quant.checkpoint import MARKER, file_digest, save_quantized


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """A tiny-llama int8 checkpoint (read-only: tests copy it)."""
    lm = load_model("tiny-llama")
    cfg = QuantConfig.parse("int8")
    quantize_model(lm.model, cfg)
    path = tmp_path_factory.mktemp("ckpt") / "q8"
    save_quantized(lm, cfg, path)
    return path


@pytest.fixture
def copy(q8, tmp_path):
    import shutil

    dst = tmp_path / "q"
    shutil.copytree(q8, dst)
    return dst


def meta(path):
    return json.loads((path / MARKER).read_text())


def rewrite(path, state=None, **changes):
    """Change the marker (and the tensors), then renew the manifest, as a careless tool
    would: the files are self-consistent, only their content is wrong."""
    if state is not None:
        save_file(state, str(path / "model.safetensors"))
    m = {**meta(path), **changes}
    if "files" in m:
        m["files"] = {n: file_digest(path / n) for n in m["files"]}
    (path / MARKER).write_text(json.dumps(m))


def test_manifest_lists_every_file(q8):
    m = meta(q8)
    assert m["version"] == 2
    assert set(m["files"]) == {"model.safetensors"}  # tiny-llama has no tokenizer
    for name, d in m["files"].items():
        assert d == file_digest(q8 / name) and len(d["sha256"]) == 64
    assert sorted(p.name for p in q8.iterdir()) == [MARKER, "model.safetensors"]
    assert not [p for p in q8.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_random_bytes_in_the_weights(copy):
    """The issue's probe: bytes overwritten inside model.safetensors loaded with rc 0 and
    produced gibberish."""
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(2048))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors does not match its SHA-256"):
        load_model(str(copy))


def test_truncated_and_missing_files(copy):
    w = copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match=rf"has {len(data) - 100} bytes, its manifest says "
                                             rf"{len(data)}"):
        load_model(str(copy))
    w.write_bytes(data)
    m = meta(copy)
    m["files"]["tokenizer.json"] = {"size": 1, "sha256": "0" * 64}
    (copy / MARKER).write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="lacks tokenizer.json, which its manifest lists"):
        load_model(str(copy))
    m["files"] = {"../outside": {"size": 1, "sha256": "0" * 64}}
    (copy / MARKER).write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="bad manifest entry"):
        load_model(str(copy))


def test_marker_int4_over_int8_tensors(copy):
    """The marker says int4, the tensors are int8: one line naming the tensor and both
    recipes' expectation (was a 265-line traceback)."""
    rewrite(copy, quant={**meta(copy)["quant"], "kind": "int4", "group_size": 32,
                         "method": "rtn"})
    with pytest.raises(ModelLoadError) as info:
        load_model(str(copy))
    msg = str(info.value)
    assert "\n" not in msg and "int4" in msg and ("missing" in msg or "shape" in msg), msg


def test_shape_and_dtype_checked_against_the_recipe(copy):
    state = load_file(str(copy / "model.safetensors"))
    name = next(k for k, v in state.items() if v.dtype == torch.int8)
    bad = dict(state)
    bad[name] = state[name][:, :-1].contiguous()
    rewrite(copy, bad)
    with pytest.raises(ModelLoadError, match=rf"tensor '{name}' has shape .*expects "):
        load_model(str(copy))
    bad[name] = state[name].float()
    rewrite(copy, bad)
    with pytest.raises(ModelLoadError, match=rf"tensor '{name}' is float32; recipe int8-all "
                                             r"stores int8"):
        load_model(str(copy))


@pytest.mark.parametrize("change", ["fewer-layers", "more-layers", "extra", "missing"])
def test_tensors_must_match_the_spec(copy, change):
    state = load_file(str(copy / "model.safetensors"))
    spec = meta(copy)["spec"]
    if change == "fewer-layers":  # the probe: loaded silently, ignoring a layer
        rewrite(copy, spec={**spec, "num_layers": spec["num_layers"] - 1})
        expect = "extra"
    elif change == "more-layers":
        rewrite(copy, spec={**spec, "num_layers": spec["num_layers"] + 1})
        expect = "missing"
    elif change == "extra":
        rewrite(copy, {**state, "layers.0.attn.extra": torch.zeros(3)})
        expect = r"extra 1 tensor\(s\), e.g. \['layers.0.attn.extra'\]"
    else:
        state.pop("norm.weight")
        rewrite(copy, state)
        expect = r"missing 1 tensor\(s\), e.g. \['norm.weight'\]"
    with pytest.raises(ModelLoadError, match=rf"do not match its {MARKER} .*{expect}"):
        load_model(str(copy))


def test_old_checkpoint_without_manifest_loads_with_a_warning(copy, q8):
    m = meta(copy)
    del m["files"]
    m["version"] = 1
    (copy / MARKER).write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="has no manifest .* not verified"):
        old = load_model(str(copy))
    new = load_model(str(q8))
    for (k, a), (_, b) in zip(old.model.state_dict().items(), new.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_malformed_marker(copy):
    (copy / MARKER).write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="is not a fastdecode-quantized file"):
        load_model(str(copy))
    (copy / MARKER).write_text(json.dumps({**meta_ok(copy), "spec": {"family": "llama"}}))
    with pytest.raises(ModelLoadError, match="is malformed"):
        load_model(str(copy))


def meta_ok(path):
    return {"format": "fastdecode-quantized", "version": 2, "quant": {"kind": "int8"}}


def test_save_refuses_a_non_empty_target_and_replaces_with_force(q8, tmp_path):
    lm = load_model(str(q8))
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty"):
        save_quantized(lm, lm.quant, target)
    assert (target / "precious.txt").read_text() == "mine"
    save_quantized(lm, lm.quant, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "model.safetensors"]
    load_model(str(target))


def test_interrupted_save_leaves_the_old_checkpoint(q8, tmp_path, monkeypatch):
    import shutil

    import safetensors.torch

    target = tmp_path / "out"
    shutil.copytree(q8, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    lm = load_model(str(q8))

    def dies(state, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(lm, lm.quant, target, force=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left
