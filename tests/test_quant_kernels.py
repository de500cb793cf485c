"""The quantized linears' backends equal the dequantize-then-matmul reference.

The eager path's quantized kernels are ``reference`` (every device), ``inductor`` (int8,
fused by torch.compile) and ``tinygemm`` (int4, PyTorch's kernel); the fused step has GEMVs
of its own (tests/test_fused.py). On the CPU, ``auto`` is the reference; on CUDA (gpu
marker) the fast backends are checked against it.
"""

import pytest
import torch

from fastdecode.errors import ConfigError
from fastdecode.quant import Int4Linear, Int8Linear, set_backend


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_auto_is_the_reference_off_cuda_and_unknown_backends_are_refused(kind):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48)
    mod = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 64)
    set_backend(mod, "auto")
    assert mod.backend == "reference"
    x = torch.randn(3, 256)
    ref = x.double() @ mod.dequantized().double().T + mod.bias.double()
    assert _rel(mod(x), ref) < 1e-5
    with pytest.raises(ConfigError):
        set_backend(mod, "triton")  # the old one-off GEMV kernels are gone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,backend", [("int8", "inductor"), ("int4", "tinygemm")])
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
