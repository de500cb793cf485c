"""Benchmarks of several configurations in one process, printed as one table: the
``bench --preset`` runs (``h2o-team``: the research team's three modes, issue 20) and
the same-run pairs of ``scripts/gpu_h2o_bench.py`` (streaming vs H2O per weight format).

A ratio between two rows is only worth having when both were measured side by side, on the
same model and device, in the same process; that is what these runs are for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from ..cache import CacheConfig, PolicyConfig
from . import tpot

# name -> (prompt tokens, decode tokens, rows: (label, weight recipe or None, cache)); a
# cache given as a callable takes (prompt_len, decode_len) (dense: room for both)
Row = tuple[str, "str | None", "PolicyConfig | Callable[[int, int], PolicyConfig]"]


def _full(prompt_len: int, decode_len: int) -> PolicyConfig:
    return CacheConfig(policy="dense", max_len=prompt_len + decode_len)


PRESETS: dict[str, tuple[int, int, list[Row]]] = {
    # the team's table: full attention in the model dtype, int8 weights with full attention,
    # int8 + H2O with their budgets (window 252, heavy 252, no sinks); batch 1
    "h2o-team": (500, 1000, [
        ("full", None, _full),
        ("int8 full", "int8", _full),
        ("int8 + H2O 252/252", "int8", CacheConfig(policy="h2o", heavy=252, recent=252,
                                                   sink=0)),
    ]),
}


def quantized(lm, recipe: str | None, inplace: bool = False):
    """``lm`` itself for None, else ``lm`` (``inplace``) or a copy with its linears quantized
    by ``recipe`` (round-to-nearest codes: speed does not depend on which codes were
    chosen)."""
    if recipe is None:
        return lm
    from ..quant import QuantConfig, quantize_model, set_backend

    out = lm if inplace else copy.copy(lm)
    if not inplace:
        out.model = copy.deepcopy(lm.model)
    quantize_model(out.model, QuantConfig.parse(recipe))
    set_backend(out.model, "auto")
    return out


def run_rows(lm, rows: list[tuple[str, str | None, PolicyConfig]], *, mode: str,
             kernels: str, prompt_len: int, decode_len: int, warmup_tokens: int, seed: int,
             log: Callable[..., None] = print, rounds: int = 1) -> dict[str, dict]:
    """Measure every row (label, weight recipe, cache) on ``lm``, grouped by recipe in order
    of first appearance: per group one model (``lm`` for None; the last group quantizes
    ``lm`` in place, so the float weights do not count in its peak memory, the others a
    copy), the group's rows ``rounds`` times interleaved (row 1, row 2, row 1, ...), and
    per row the run of median TPOT kept, with every round's median beside it. A row that
    fails records its error; the others go on."""
    import gc

    import torch

    cuda = lm.model.device.type == "cuda"
    prompt = tpot.random_prompt(prompt_len, lm.spec.vocab_size, seed, lm.model.device)
    recipes = list(dict.fromkeys(recipe for _, recipe, _ in rows))
    out: dict[str, dict] = {}
    for gi, recipe in enumerate(recipes):
        group = [(label, cache) for label, r, cache in rows if r == recipe]
        runs: dict[str, list[dict]] = {label: [] for label, _ in group}
        built: dict[str, tuple] = {}
        try:
            model = quantized(lm, recipe, inplace=gi == len(recipes) - 1)
        except Exception as e:  # noqa: BLE001
            for label, cache in group:
                out[label] = {"label": label, "quant": recipe, "cache": cache.to_dict(),
                              "error": f"quantize: {type(e).__name__}: {e}"[:2000]}
            continue
        for _ in range(rounds):
            for label, cache in group:
                if label in out:  # failed
                    continue
                try:
                    if label not in built:
                        built[label] = tpot.build_and_compile(model, cache, mode,
                                                              kernels=kernels)
                    dec, step, compile_s = built[label]
                    r = tpot.measure(step, dec, prompt=prompt, decode_len=decode_len,
                                     warmup_tokens=warmup_tokens, compile_s=compile_s)
                    r = dict(r.to_dict(), label=label, quant=recipe)
                    runs[label].append(r)
                    log(f"{label}: TPOT median {r['tpot_ms']['median']:.3f} ms, total "
                        f"{r['total_ms']:.1f} ms")
                except Exception as e:  # noqa: BLE001 - keep the other rows
                    out[label] = {"label": label, "quant": recipe, "cache": cache.to_dict(),
                                  "error": f"{type(e).__name__}: {e}"[:2000]}
                    log(f"{label} FAILED: {e}")
                    built.pop(label, None)
                if rounds == 1:  # free its cache before the next row's peak is measured
                    built.pop(label, None)
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
        for label, rs in runs.items():
            if label not in out and rs:
                mid = sorted(rs, key=lambda r: r["tpot_ms"]["median"])[len(rs) // 2]
                out[label] = dict(mid, rounds_tpot_median_ms=[r["tpot_ms"]["median"]
                                                              for r in rs])
        del built, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {label: out[label] for label, _, _ in rows if label in out}


def preset_rows(name: str, prompt_len: int, decode_len: int, dtype: str):
    """The rows of preset ``name`` with their caches for these lengths."""
    _, _, rows = PRESETS[name]
    return [((f"{dtype} {label}" if recipe is None else label), recipe,
             cache(prompt_len, decode_len) if callable(cache) else cache)
            for label, recipe, cache in rows]


def table(rows: dict[str, dict], base: str | None = None) -> list[str]:
    """The printed table: TPOT (median, mean), prefill, total time, peak memory; with
    ``base``, every row's TPOT over that row's."""
    lines = [f"{'mode':28s} {'TPOT med':>9s} {'TPOT mean':>9s} {'prefill':>9s} "
             f"{'total':>10s} {'peak GB':>8s}" + ("   vs " + base if base else "")]
    for label, r in rows.items():
        if "error" in r:
            lines.append(f"{label:28s} FAILED: {r['error'][:100]}")
            continue
        t = r["tpot_ms"]
        peak = r.get("peak_mem_gb")
        line = (f"{label:28s} {t['median']:9.3f} {t['mean']:9.3f} {r['prefill_ms']:9.1f} "
                f"{r['total_ms']:10.1f} " + (f"{peak:8.2f}" if peak is not None else
                                             f"{'n/a':>8s}"))
        if base and "tpot_ms" in rows.get(base, {}):
            line += f"   x{t['median'] / rows[base]['tpot_ms']['median']:.3f}"
        lines.append(line)
    lines.append("(ms; peak: the device's peak allocated memory in the run, n/a on the CPU)")
    return lines


__all__ = ["PRESETS", "preset_rows", "quantized", "run_rows", "table"]
