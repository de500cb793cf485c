"""Our Triton GEMV kernels equal the dequantize-then-matmul reference on random inputs.

On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set before the kernels
are defined); on CUDA (gpu marker) compiled, through the modules' backends, with tinygemm.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton_gemv = pytest.importorskip("fastdecode.quant.triton_gemv")

from fastdecode.quant import Int4Linear, Int8Linear, set_backend  # noqa: E402
from fastdecode.quant.int4 import dequantize_int4, quantize_int4  # noqa: E402
from fastdecode.quant.int8 import dequantize_int8, quantize_int8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@given(N=st.integers(1, 70), kb=st.integers(1, 3), seed=st.integers(0, 2**16),
       bias=st.booleans(), mag=st.sampled_from([1e-2, 1.0, 100.0]))
@settings(max_examples=8)
def test_int8_gemv_matches_reference(N, kb, seed, bias, mag):
    gen = torch.Generator().manual_seed(seed)
    K = 128 * kb + (17 if kb > 1 else 0)  # ragged K exercises the masks
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(1, K, generator=gen) * mag
    b = torch.randn(N, generator=gen) if bias else None
    q, s = quantize_int8(w)
    y = triton_gemv.int8_gemv(x.to(DEV), q.to(DEV), s.to(DEV), None if b is None else b.to(DEV),
                              autotune=False)
    ref = x.double() @ dequantize_int8(q, s).double().T + (0 if b is None else b.double())
    assert _rel(y.cpu(), ref) < 1e-5


@given(N=st.integers(1, 40), g=st.sampled_from([32, 64, 128]), groups=st.integers(1, 4),
       seed=st.integers(0, 2**16), bias=st.booleans())
@settings(max_examples=8)
def test_int4_gemv_matches_reference(N, g, groups, seed, bias):
    gen = torch.Generator().manual_seed(seed)
    K = g * groups
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(1, K, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    p, s, z = quantize_int4(w, g)
    y = triton_gemv.int4_gemv(x.to(DEV), p.to(DEV), s.to(DEV), z.to(DEV),
                              None if b is None else b.to(DEV), g, autotune=False)
    ref = x.double() @ dequantize_int4(p, s, z, g).double().T + (0 if b is None else b.double())
    assert _rel(y.cpu(), ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,backend", [("int8", "triton"), ("int8", "inductor"),
                                          ("int4", "triton"), ("int4", "tinygemm")])
@pytest.mark.parametrize("rows", [1, 5])
def test_cuda_backends_match_reference(kind, backend, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(2560, 1024, bias=True).to("cuda", torch.bfloat16)
    mod = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 128)
    x = torch.randn(rows, 2560, device="cuda", dtype=torch.bfloat16)
    ref = mod(x)  # reference backend
    set_backend(mod, backend)
    assert mod.backend == backend
    assert _rel(mod(x).float(), ref.float()) < 1e-2  # bf16 operands
