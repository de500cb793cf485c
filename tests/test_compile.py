"""The compiled decode step equals the eager one (``--compile default`` on the CPU), the
greedy device loop equals host-side greedy decoding, and ``graphs`` needs CUDA.

On a CUDA machine the ``gpu``-marked tests also check the CUDA-graphed step. Inductor
compiles ``attention.attend`` as written: there is no second decode-attention path here
(the fused step's is tested in test_fused.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdecode.cache import CacheConfig
from fastdecode.compile import compile_decoder
from fastdecode.engine import Decoder
from fastdecode.errors import ConfigError, DeviceError

CUDA = torch.cuda.is_available()

# (model, cache, gemv, compile before or after the prefill). Streaming: 12 + 36 tokens
# through 4 sinks + a 16-token window wraps the ring twice; dense: 48 of 64 slots.
CASES = [
    ("tiny-neox", CacheConfig(policy="streaming", sink=4, window=16), "extern", "before"),
    ("tiny-llama", CacheConfig(policy="dense", max_len=64), "reduction", "after"),
]


def _prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,cfg,gemv,when", CASES, ids=[f"{c[0]}-{c[1].policy}-{c[2]}"
                                                          for c in CASES])
def test_compiled_step_matches_eager(tiny_models, name, cfg, gemv, when):
    from torch._inductor.utils import run_and_get_code

    lm = tiny_models[name]
    ref = Decoder.build(lm.model, cfg)
    dec = Decoder.build(lm.model, cfg)
    prompt = _prompt(12, lm.spec.vocab_size)
    a = ref.prefill(prompt)
    if when == "before":
        step = compile_decoder(dec, "default", gemv=gemv)
        b = dec.prefill(prompt)
    else:  # compiling (and its warm-up) after the prefill must not disturb the cache
        b = dec.prefill(prompt)
        step = compile_decoder(dec, "default", gemv=gemv)
    torch.testing.assert_close(b, a)
    tok = torch.argmax(a, -1, keepdim=True)
    kept = []
    for i in range(36):
        a = ref.step(tok)
        if i == 0:  # the first compiled call compiles: look at the code it generated
            b, codes = run_and_get_code(dec.step, tok)
            # The cache is written in place: no buffer of a layer's cache shape is made
            # (a mutation through a view of the cache used to be functionalised into a
            # copy of the layer's cache plus a copy of the whole cache back, every step).
            s = dec.cache
            layer_shape = f"({lm.spec.num_kv_heads}, {s.slots}, {lm.spec.head_dim})"
            assert not any(f"empty_strided_cpu({layer_shape}" in c for c in codes), codes[0]
        else:
            b = dec.step(tok)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        kept.append((a, b))
        tok = torch.argmax(a, -1, keepdim=True)
    for a, b in kept:  # nothing handed back was overwritten by a later step
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert step.mode == "default" and step.gemv == gemv and step.attention == "inductor"

    # The device loop (token and position advanced inside the compiled step) is greedy
    # decoding: the same tokens as feeding argmax back by hand.
    want = []
    t = tok
    for _ in range(6):
        t = torch.argmax(ref.step(t), -1, keepdim=True)
        want.append(int(t))
    got = step.greedy(tok, 6)
    assert got.tolist() == want
    assert dec.t == ref.t


def test_graphs_needs_cuda(tiny_neox):
    dec = Decoder.build(tiny_neox.model, CacheConfig(policy="streaming", sink=4, window=16))
    with pytest.raises(DeviceError, match="CUDA"):
        compile_decoder(dec, "graphs")


def test_bad_options(tiny_neox):
    dec = Decoder.build(tiny_neox.model, CacheConfig(policy="streaming", sink=4, window=16))
    with pytest.raises(ConfigError):
        compile_decoder(dec, "fast")
    with pytest.raises(ConfigError):
        compile_decoder(dec, "default", gemv="cutlass")
    with pytest.raises(ConfigError):
        compile_decoder(dec, "default", kernels="triton")
    with pytest.raises(TypeError):  # the old inductor attention switch is gone
        compile_decoder(dec, "default", attention="triton")


def test_eager_mode_greedy_loop(tiny_llama):
    cfg = CacheConfig(policy="streaming", sink=2, window=8, compress_every=3)
    ref = Decoder.build(tiny_llama.model, cfg)
    dec = Decoder.build(tiny_llama.model, cfg)
    step = compile_decoder(dec, "none")
    assert dec.step_fn == dec.eager_step
    prompt = _prompt(5, tiny_llama.spec.vocab_size, 1)
    tok = torch.argmax(ref.prefill(prompt), -1, keepdim=True)
    dec.prefill(prompt)
    want, t = [], tok
    for _ in range(20):
        t = torch.argmax(ref.step(t), -1, keepdim=True)
        want.append(int(t))
    assert step.greedy(tok, 20).tolist() == want


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphs_match_eager_cuda(tiny_model_factory):
    lm = tiny_model_factory("tiny-neox")
    model = lm.model.to("cuda")
    try:
        cfg = CacheConfig(policy="streaming", sink=4, window=16)
        ref, dec = Decoder.build(model, cfg), Decoder.build(model, cfg)
        step = compile_decoder(dec, "graphs", kernels="inductor")
        prompt = _prompt(12, lm.spec.vocab_size).cuda()
        a, b = ref.prefill(prompt), dec.prefill(prompt)
        tok = torch.argmax(a, -1, keepdim=True)
        kept = []
        for _ in range(40):
            a, b = ref.step(tok), dec.step(tok)
            kept.append((a, b))
            tok = torch.argmax(a, -1, keepdim=True)
        for a, b in kept:
            assert ((a - b).norm() / a.norm()).item() < 1e-3
        assert step.graph is not None and math.isfinite(float(kept[-1][1].sum()))
    finally:
        lm.model.to("cpu")
