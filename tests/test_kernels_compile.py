"""Every Triton kernel of the package compiles ahead of time for sm_80 (A800/A100) and sm_90
(H200), on the CPU: no GPU. The launches are recorded under the interpreter (representative
tests, plus the prefill kernels on bfloat16), then each (kernel, types, constexprs,
num_warps, num_stages) is compiled to a cubin with Triton's bundled ptxas. See
tests/kernel_launches.py; docs/gpu.md says what this does not check. Marked slow: the
flash prefill tiles of the GPUs (128 x 64) take minutes to compile on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent
# The launches that reach every kernel: the fused decode step (bf16 and float, int8/int4
# weights, int8 KV), the scored policies (h2o / tova), the prefill kernels.
RECORD_TESTS = [
    "tests/test_fused.py::test_fused_step_matches_eager",
    "tests/test_fused.py::test_fused_step_quantized_matches_eager",
    "tests/test_fused.py::test_fused_bf16_close_to_eager_and_finite",
    "tests/test_fused_scored.py::test_fused_scored_step_equals_eager_and_oracle",
    "tests/test_fused_scored.py::test_fused_scored_int8_kv",
    "tests/test_prefill.py::test_prefill_rope_equals_rope_apply",
    "tests/test_prefill.py::test_dual_layer_norm_equals_two_layer_norms",
]
# Every kernel the package launches (`kernel[grid](...)`); the device helpers they call are
# compiled with them.
LAUNCHED = {f"fastdecode.{k}" for k in (
    "fused.kernels.gemv_kernel", "fused.kernels.norm_kernel", "fused.kernels.cos_sin_kernel",
    "fused.kernels.decode_plan_kernel", "fused.kernels.rope_write_kernel",
    "fused.kernels.argmax_kernel", "fused.kernels.attn_split_kernel",
    "fused.kernels.attn_combine_kernel", "fused.scored_kernels.attn_combine_scored_kernel",
    "fused.scored_kernels.scored_evict_kernel", "kernels.flash_prefill._flash_prefill",
    "kernels.prefill_norm._dual_layer_norm", "kernels.prefill_rope._prefill_rope")}


def _run(args, env, what):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, f"{what} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE)]),
                TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    interp = dict(base, TRITON_INTERPRET="1", FASTDECODE_LAUNCHES=str(tmp_path / "tests.json"))
    _run(["-m", "pytest", "-q", "-p", "kernel_launches", "-p", "no:cacheprovider",
          *RECORD_TESTS], interp, "recording the launches")
    _run([str(HERE / "kernel_launches.py"), "bf16", str(tmp_path / "bf16.json")], interp,
         "recording the bfloat16 prefill launches")
    gpu = {k: v for k, v in base.items() if k != "TRITON_INTERPRET"}
    _run([str(HERE / "kernel_launches.py"), "compile", str(tmp_path / "tests.json"),
          str(tmp_path / "bf16.json"), "--report", str(tmp_path / "report.json")], gpu,
         "the ahead-of-time compile")
    results = json.loads((tmp_path / "report.json").read_text())
    missing = LAUNCHED - {r["kernel"] for r in results}
    assert not missing, f"no launch of {sorted(missing)} was recorded: extend RECORD_TESTS"
    failed = [f"{r['kernel']} on {r['target']} (num_warps={r['num_warps']}, types "
              f"{r['types']}, constexprs {r['constexprs']}): {r['error']}"
              for r in results if not r["ok"]]
    assert not failed, "kernels that do not compile:\n" + "\n".join(failed)
