"""Every registered configuration runs on small random models and stays faithful:
unquantized ones equal their policy's reference (StreamingLLM, H2O, TOVA), quantized ones
stay near it."""

from dataclasses import replace

import pytest
import torch

from fastdecode import registry
from fastdecode.cache import make_cache
from fastdecode.engine import Decoder
from fastdecode.errors import ConfigError
from fastdecode.models import load_model
from fastdecode.quant import QuantConfig, quantize_model
from fastdecode.reference.streaming import streaming_logits


def shrink(cache):
    """The same policy at test scale: windows of a few tokens, lazy R kept but small."""
    if cache.max_tokens is not None:  # nothing evicted: room for the test's tokens
        return replace(cache, max_len=64)
    if cache.policy == "h2o":
        return replace(cache, heavy=3, recent=2, sink=min(cache.sink, 2))
    if cache.policy == "tova":
        return replace(cache, budget=6)
    if cache.policy == "refresh":
        return replace(cache, window=4, refresh=2, refresh_every=3)
    return replace(cache, window=5 + cache.window % 3, compress_every=min(cache.compress_every, 4))


def reference_logits(model, toks, c):
    """The oracle of the configuration's policy fed the test's chunks (prefill 17 in chunks
    of 7, then steps): StreamingLLM's for the streaming family, H2O's / TOVA's for theirs."""
    if c.policy in ("h2o", "tova"):
        from fastdecode.reference.h2o import h2o_logits
        from fastdecode.reference.tova import tova_logits

        kw = dict(position_mode=c.position_mode, chunks=[7, 7, 3] + [1] * (len(toks) - 17),
                  kv_int8=c.kv_dtype == "int8")
        if c.policy == "h2o":
            return h2o_logits(model, toks, heavy=c.heavy, recent=c.recent, sink=c.sink,
                              **kw).logits
        return tova_logits(model, toks, budget=c.budget, sink=c.sink, **kw).logits
    if c.policy == "refresh":  # its prefill is exact: the oracle steps token by token
        from fastdecode.reference.refresh import refresh_logits

        return refresh_logits(model, toks, sink=c.sink, window=c.window, refresh=c.refresh,
                              every=c.refresh_every, select=c.refresh_select,
                              position_mode=c.position_mode)[0]
    window = None if c.max_tokens is not None else c.budget - c.sink
    return streaming_logits(model, toks, c.sink, window, c.compress_every, c.position_mode)


@pytest.mark.parametrize("name", sorted(registry.CONFIGS))
@pytest.mark.parametrize("family", ["small-neox", "small-llama"])
def test_config_runs_and_matches_reference(name, family):
    cfg = registry.get(name)
    cache_cfg = shrink(cfg.speed_cache)
    base = load_model(family)
    toks = torch.randint(0, base.spec.vocab_size, (30,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(base.model, toks, cache_cfg)
    lm = load_model(family)
    if cfg.quant:
        qc = QuantConfig.parse(cfg.quant)
        calib = None  # GPTQ, kd: fitted on other random tokens (the small models have no text)
        if qc.calibrates:
            calib = torch.randint(0, base.spec.vocab_size, (512,),
                                  generator=torch.Generator().manual_seed(2))
        quantize_model(lm.model, qc, calib)
    dec = Decoder(lm.model, make_cache(cache_cfg, lm.spec), chunk_size=7)
    out = torch.cat([dec.prefill(toks[:17], all_logits=True),
                     torch.stack([dec.step(int(t)) for t in toks[17:]])])
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    if cfg.quant:
        bound = 0.5 if "int4" in cfg.quant else 0.05
    else:
        bound = 0.02 if cache_cfg.kv_dtype == "int8" else 1e-5
    assert rel < bound


def test_registry_names_and_errors():
    assert {"bf16-stream-graphs", "int8-all-graphs", "int4-mlp-g128-graphs", "int8kv-graphs",
            "lazy-r32-graphs"} <= set(registry.CONFIGS)
    for cfg in registry.CONFIGS.values():
        assert cfg.to_dict()["name"] == cfg.name
        if cfg.quant:
            QuantConfig.parse(cfg.quant)
            speed = QuantConfig.parse(cfg.speed_quant)  # the same format, no calibration
            assert not speed.calibrates
            assert replace(speed, method=None) == replace(QuantConfig.parse(cfg.quant),
                                                          method=None)
    with pytest.raises(ConfigError, match="unknown configuration"):
        registry.get("bf16-nonsense")
