"""Record the package's Triton launches under the interpreter, then compile them ahead of time.

Used by ``tests/test_kernels_compile.py``, in three subprocesses:

* as a pytest plugin (``-p kernel_launches``, with ``TRITON_INTERPRET=1`` and
  ``FASTDECODE_LAUNCHES`` naming a JSON file): every ``InterpretedFunction.run`` (one
  ``kernel[grid](...)`` launch) is recorded -- module, name, each argument's Triton signature
  type, the constexpr values, ``num_warps`` / ``num_stages`` -- while the chosen tests run;
* ``python kernel_launches.py bf16 OUT.json`` (``TRITON_INTERPRET=1``): the prefill kernels
  launched on bfloat16 inputs, recorded but *not executed* (the interpreter has no bfloat16
  dot), so the types a GPU runs are covered;
* ``python kernel_launches.py compile IN.json... --report R.json`` (no interpreter): the real
  ``JITFunction`` of each record is compiled by ``triton.compile`` for sm_80 and sm_90 down
  to a cubin (Triton's bundled ptxas: no GPU needed).
"""

from __future__ import annotations

import json
import os
import sys
import time

TARGETS = (80, 90)
_DRY = False
_RECORDS: dict[str, dict] = {}

_TORCH_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
                "int8": "i8", "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64",
                "bool": "i1"}


def _arg(value, constexpr: bool):
    """One argument as JSON: {"const": value} for a constexpr, else {"type": signature type}."""
    import torch
    import triton.language as tl

    if constexpr:
        if isinstance(value, tl.dtype):
            return {"const": str(value), "tl_dtype": True}
        if isinstance(value, tl.constexpr):
            value = value.value
        return {"const": value}
    if value is None:
        return {"const": None}
    if isinstance(value, torch.Tensor):
        return {"type": "*" + _TORCH_TYPES[str(value.dtype).removeprefix("torch.")]}
    if isinstance(value, bool):
        return {"type": "i1"}
    if isinstance(value, int):
        return {"type": "i32" if -2**31 <= value < 2**31 else "i64"}
    if isinstance(value, float):
        return {"type": "fp32"}
    raise TypeError(f"unrecorded argument type {type(value).__name__}")


def install() -> None:
    """Wrap the interpreter's launch to record each (kernel, types, constexprs) once."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        meta = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k not in meta})
        rec_args = {}
        for name, value in bound.arguments.items():
            ann = sig.parameters[name].annotation
            rec_args[name] = _arg(value, "constexpr" in str(ann))
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "args": rec_args,
               "num_warps": meta.get("num_warps", 4), "num_stages": meta.get("num_stages", 3)}
        _RECORDS.setdefault(json.dumps(rec, sort_keys=True), rec)
        if _DRY or warmup:
            return None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def dump(path: str) -> None:
    with open(path, "w") as f:
        json.dump(list(_RECORDS.values()), f, indent=1)


# -- pytest plugin -----------------------------------------------------------------------------

def pytest_configure(config):
    if os.environ.get("FASTDECODE_LAUNCHES"):
        install()


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FASTDECODE_LAUNCHES"):
        dump(os.environ["FASTDECODE_LAUNCHES"])


# -- bfloat16 prefill launches, recorded only --------------------------------------------------

def record_bf16(path: str) -> None:
    """The prefill kernels on bfloat16 tensors (and int8 KV codes), recorded, not run."""
    global _DRY
    import torch

    from fastdecode.kernels.flash_prefill import CONFIGS, flash_prefill
    from fastdecode.kernels.prefill_norm import dual_layer_norm
    from fastdecode.kernels.prefill_rope import prefill_rope

    install()
    _DRY = True
    bf = torch.bfloat16
    T, Hq, Hkv, D, half = 24, 4, 2, 64, 16
    for d in (64, 80):  # 80: the two-part head split
        qkv = torch.randn(T, Hq + 2 * Hkv, d, dtype=bf)
        rot = (torch.randn(T, half, dtype=bf), torch.randn(T, half, dtype=bf))
        prefill_rope(qkv, Hq, Hkv, rot)
        prefill_rope(qkv, Hq, Hkv, rot, queries=True)
        prefill_rope(qkv, Hq, Hkv, rot, rot_sink=rot, queries=True)
    for bias, rb in ((True, True), (True, False), (False, False)):
        norms = [torch.nn.LayerNorm(D * 4, bias=bias, dtype=bf) for _ in range(2)]
        dual_layer_norm(torch.randn(T, D * 4, dtype=bf), *norms,
                        torch.randn(D * 4, dtype=bf) if rb else None)
    pos = torch.arange(T)
    q_lo = torch.zeros(T, dtype=torch.int64)
    for d in (64, 80):
        q = torch.randn(Hq, T, d, dtype=bf)
        k = torch.randn(Hkv, T, d, dtype=bf)
        rot = (torch.randn(T, half, dtype=bf), torch.randn(T, half, dtype=bf))
        for sink, rotate, int8 in ((0, False, False), (4, False, False), (4, True, False),
                                   (0, True, False), (0, False, True), (4, True, True)):
            kk, ks = k, None
            if int8:
                kk, ks = torch.zeros(Hkv, T, d, dtype=torch.int8), torch.ones(Hkv, T, dtype=bf)
            for config in (None, *CONFIGS.values()):  # + the sm_80 / sm_90 tiles
                flash_prefill(q, q if sink and not rotate else None, kk, kk, ks, ks, pos, q_lo,
                              pos, sink, config=config, rot=rot if rotate else None,
                              rot_sink=rot if rotate and sink else None)
    dump(path)


# -- ahead-of-time compile ---------------------------------------------------------------------

def compile_records(paths: list[str], report: str) -> None:
    import importlib
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    recs = {}
    for p in paths:
        for r in json.load(open(p)):
            recs.setdefault(json.dumps(r, sort_keys=True), r)
    results = []
    for r in recs.values():
        fn = getattr(importlib.import_module(r["module"]), r["name"])
        sig, consts = {}, {}
        for p in fn.params:
            a = r["args"].get(p.name)
            if a is None:  # not passed: its default
                a = {"const": p.default.value if isinstance(p.default, tl.constexpr)
                     else p.default} if p.is_constexpr else None
                if a is None:
                    raise ValueError(f"{r['name']}: no value for {p.name}")
            if "const" in a:
                v = a["const"]
                consts[p.name] = tl.str_to_ty(v, None) if a.get("tl_dtype") else v
                sig[p.name] = "constexpr"
            else:
                sig[p.name] = a["type"]
        for cc in TARGETS:
            res = {"kernel": f"{r['module']}.{r['name']}", "target": f"sm_{cc}",
                   "types": sorted({t for t in sig.values() if t != "constexpr"}),
                   "constexprs": {k: str(v) for k, v in consts.items()},
                   "num_warps": r["num_warps"], "num_stages": r["num_stages"]}
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": r["num_warps"],
                                            "num_stages": r["num_stages"]})
                res["ok"] = bool(k.asm.get("cubin"))
                res["error"] = None if res["ok"] else "no cubin"
            except Exception as e:  # reported per kernel and target
                res["ok"] = False
                res["error"] = f"{type(e).__name__}: {e}"[:4000] or traceback.format_exc()
            res["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(res)
    with open(report, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "bf16":
        record_bf16(sys.argv[2])
    elif sys.argv[1] == "compile":
        compile_records(sys.argv[2:-2], sys.argv[-1])
