"""The one registry of named configurations: unit tests, benchmarks and budgets all read it.

A configuration is a cache policy, a weight recipe, a KV storage and a compile mode; speed
on Pythia-2.8B shapes (``speed_cache``), perplexity on SmolLM2-135M (``ppl_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .cache import CacheConfig, PolicyConfig
from .config import CompileConfig
from .errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    name: str
    speed_cache: PolicyConfig
    ppl_cache: PolicyConfig
    compile: CompileConfig = field(default_factory=CompileConfig)
    quant: str | None = None  # a recipe for fastdecode.quant.QuantConfig.parse
    dtype: str = "bfloat16"
    description: str = ""

    @property
    def speed_quant(self) -> str | None:
        """The recipe for speed runs: the same stored format with round-to-nearest codes (speed
        does not depend on the codes; random weights give calibration nothing to fit)."""
        if not self.quant:
            return None
        from .quant import QuantConfig

        qc = QuantConfig.parse(self.quant)
        return replace(qc, method="rtn").name if qc.calibrates else self.quant

    def to_dict(self) -> dict:
        return {"name": self.name, "speed_cache": self.speed_cache.to_dict(),
                "ppl_cache": self.ppl_cache.to_dict(), "compile": self.compile.mode,
                "kernels": self.compile.kernels,
                "quant": self.quant, "dtype": self.dtype, "description": self.description}


def _streaming(window: int, ppl_window: int, **kw) -> tuple[PolicyConfig, PolicyConfig]:
    return (CacheConfig(policy="streaming", sink=4, window=window, **kw),
            CacheConfig(policy="streaming", sink=4, window=ppl_window, **kw))


_STREAM = _streaming(2048, 1020)


def _configs() -> list[RunConfig]:
    graphs, compiled, eager = CompileConfig("graphs"), CompileConfig("default"), CompileConfig()
    out = [
        RunConfig("bf16-dense-graphs", CacheConfig(policy="dense", max_len=4096),
                  CacheConfig(policy="dense", max_len=8192), graphs,
                  description="dense KV (no eviction), compiled + graphed"),
        RunConfig("bf16-stream-eager", *_STREAM, eager, description="4+2048 streaming, eager"),
        RunConfig("bf16-stream-compiled", *_STREAM, compiled,
                  description="4+2048 streaming, compiled kernels launched one by one (no "
                              "CUDA graph; on CUDA the fused Triton step)"),
        RunConfig("bf16-stream-graphs", *_STREAM, graphs,
                  description="4+2048 streaming, fused step captured as a CUDA graph"),
        RunConfig("int8-all-graphs", *_STREAM, graphs, quant="int8",
                  description="int8 weight-only, all linears"),
        # int4: calibrated codes for perplexity (docs/quant.md), timed with plain rounding
        RunConfig("int4-mlp-g128-graphs", *_STREAM, graphs, quant="int4-mlp-g128-kd",
                  description="int4 g128 weight-only (GPTQ + distillation), MLP only"),
        RunConfig("int4-mlp-g64-graphs", *_STREAM, graphs, quant="int4-mlp-g64-gptq",
                  description="int4 g64 weight-only (GPTQ), MLP only"),
        RunConfig("int4-all-g128-graphs", *_STREAM, graphs, quant="int4-g128-gptq",
                  description="int4 g128 weight-only (GPTQ), all linears (not the head)"),
        RunConfig("int8kv-graphs", *_streaming(2048, 1020, kv_dtype="int8"), graphs,
                  description="int8 KV cache (per-head, per-token scales)"),
        RunConfig("lazy-r32-graphs", *_streaming(2048, 1020, compress_every=32), graphs,
                  description="lazy eviction every 32 tokens"),
    ]
    # Score-based eviction in the fused, graphed step (issue 20): H2O at the streaming
    # budget (4 + 2048 slots: sink 4, heavy 1024, recent 1024), beside int8 / int4 weights,
    # and TOVA at the same budget; perplexity at SmolLM2 scale with the 1024-token budget
    # of the streaming entries' ppl_cache (4 + 1020).
    h2o = (CacheConfig(policy="h2o", sink=4, heavy=1024, recent=1024),
           CacheConfig(policy="h2o", sink=4, heavy=510, recent=510))
    for prefix, quant in (("bf16", None), ("int8", "int8"), ("int4-mlp-g128", "int4-mlp-g128-kd")):
        out.append(RunConfig(f"{prefix}-h2o-graphs", *h2o, graphs, quant=quant,
                             description="H2O sink 4 + heavy 1024 + recent 1024, fused step "
                                         "captured as a CUDA graph"
                                         + (f", {quant} weights" if quant else "")))
    out.append(RunConfig("bf16-tova-graphs", CacheConfig(policy="tova", budget=2052),
                         CacheConfig(policy="tova", budget=1024), graphs,
                         description="TOVA, 2052 tokens per layer, fused step captured as "
                                     "a CUDA graph"))
    # Refresh (#23) in the eviction study's shape (R = B/4 every 2R) at 4 + 2048 and 1024
    # tokens; torch.compile's graph (the fused step does not run it).
    for select in ("uniform", "score"):
        out.append(RunConfig(
            f"bf16-refresh-{select}-graphs",
            CacheConfig(policy="refresh", sink=4, window=1536, refresh=512,
                        refresh_every=1024, refresh_select=select),
            CacheConfig(policy="refresh", sink=4, window=764, refresh=256, refresh_every=512,
                        refresh_select=select), graphs,
            description=f"refresh ({select}) 4 + 1536 + 512 every 1024, compiled + graphed"))
    # The 2048 window is bf16-stream-graphs.
    for w, pw in ((512, 252), (1024, 508)):
        out.append(RunConfig(f"window-{w}-graphs", *_streaming(w, pw), graphs,
                             description=f"4+{w} streaming, compiled + graphed"))
    return out


CONFIGS: dict[str, RunConfig] = {c.name: c for c in _configs()}


def get(name: str) -> RunConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}") from None

