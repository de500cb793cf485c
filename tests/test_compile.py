"""The compiled decode step equals the eager one (``--compile default`` on the CPU), the
greedy device loop equals host-side greedy decoding, and ``graphs`` needs CUDA.

On a CUDA machine the ``gpu``-marked tests also check the CUDA-graphed step and the fused
decode-attention kernel; on the CPU that kernel is checked under Triton's interpreter.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

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
    assert step.mode == "default" and step.gemv == gemv

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
    if not CUDA:
        with pytest.raises(DeviceError):
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


_KERNEL_CHECK = textwrap.dedent("""
    import math, os, torch
    from fastdecode import compile as fc
    op = fc._decode_attention_op()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    def ref(q, qs, k, v, mask, S):
        Hq, _, D = q.shape; Hkv, N, _ = k.shape; G = Hq // Hkv
        kk = k.double().repeat_interleave(G, 0); vv = v.double().repeat_interleave(G, 0)
        sw = q.double() @ kk.transpose(1, 2); ss = qs.double() @ kk.transpose(1, 2)
        sc = torch.cat((ss[..., :S], sw[..., S:]), -1) / math.sqrt(D)
        return torch.softmax(sc.masked_fill(~mask, float("-inf")), -1) @ vv
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for Hq, Hkv, D, N, S in [(6, 2, 80, 150, 4), (4, 4, 64, 700, 0), (3, 1, 16, 5, 2)]:
        q, qs = torch.randn(Hq, 1, D, generator=g), torch.randn(Hq, 1, D, generator=g)
        cache = torch.randn(2, Hkv, N, D, generator=g)  # a layer view of an [L, ...] buffer
        v = torch.randn(Hkv, N, D, generator=g) * 3
        mask = torch.rand(1, N, generator=g) > 0.3
        mask[0, 0] = True
        r = ref(q, qs, cache[1], v, mask, S)
        out = op(*(t.to(dev) for t in (q, qs, cache[1], v, mask)), S, 1 / math.sqrt(D))
        worst = max(worst, ((out.double().cpu() - r).abs().max() / r.abs().max()).item())
    print("WORST", worst)
""")


def test_fused_decode_attention_kernel():
    """The fused kernel vs float64 softmax attention (sinks scored with their own query,
    GQA, ragged head dim, masked slots), in a subprocess so that Triton's interpreter can be
    switched on before the kernels are defined."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0" if CUDA else "1")
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("attention", ["triton", "inductor"])
def test_graphs_match_eager_cuda(tiny_model_factory, attention):
    lm = tiny_model_factory("tiny-neox")
    model = lm.model.to("cuda")
    try:
        cfg = CacheConfig(policy="streaming", sink=4, window=16)
        ref, dec = Decoder.build(model, cfg), Decoder.build(model, cfg)
        step = compile_decoder(dec, "graphs", attention=attention)
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
