"""Where the fused H2O/TOVA step parts from the eager score cache on CUDA: per step and
layer, the first buffer (pos, free, newer, score) that differs, graphed or not, PDL on or
off (the h2o phase's graphed test failed on the H200 at dd723c6)."""
import copy
import sys

import torch

from fastdecode.cache import H2OConfig, TOVAConfig
from fastdecode.compile import compile_decoder
from fastdecode.engine import Decoder
from fastdecode.fused import FusedOptions
from fastdecode.models import load_model


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-9))


def run(cfg, mode, pdl, steps=12, preset="small-neox", prompt_len=60):
    torch.manual_seed(0)
    lm = load_model(preset, dtype=torch.float32, device="cuda")
    prompt = torch.randint(0, lm.spec.vocab_size, (prompt_len,), device="cuda")
    ref = Decoder.build(lm.model, cfg)
    dec = Decoder.build(copy.deepcopy(lm.model), cfg)
    a = ref.prefill(prompt)
    dec.prefill(prompt)
    compile_decoder(dec, mode, kernels="fused", options=FusedOptions.from_env(pdl=pdl))
    tok = int(torch.argmax(a))
    for i in range(steps):
        a, b = ref.step(tok), dec.step(tok)
        e, f = ref.cache, dec.cache
        bad = []
        for name in ("pos", "free", "newer", "score"):
            x, y = getattr(e, name), getattr(f, name)
            if name == "score":
                d = (x - y).abs().flatten(1).amax(1)
                lay = [j for j in range(d.numel()) if d[j] > 1e-5]
            else:
                lay = [j for j in range(x.shape[0]) if not torch.equal(x[j], y[j])]
            if lay:
                bad.append(f"{name} layers {lay[:6]}")
        err = rel(b.float(), a.float())
        print(f"  {cfg.policy} {mode} pdl={pdl} step {i}: logits rel {err:.2e}"
              f" {'; '.join(bad) or 'buffers equal'}", flush=True)
        if bad:
            j = int(bad[0].split("[")[1].split(",")[0].rstrip("]"))
            print("   eager pos", e.pos[j, 0].tolist()[:70],
                  "\n   fused pos", f.pos[j, 0].tolist()[:70])
            print("   eager free", e.free[j].tolist(), "fused free", f.free[j].tolist())
            break
        tok = int(torch.argmax(a))


for cfg in (H2OConfig(heavy=24, recent=20, sink=4), TOVAConfig(budget=40, sink=2)):
    for mode in ("default", "graphs"):
        for pdl in (True, False):
            try:
                run(cfg, mode, pdl)
            except Exception as exc:  # noqa: BLE001
                print(f"  {cfg.policy} {mode} pdl={pdl}: {type(exc).__name__}: {exc}"[:400])
    sys.stdout.flush()
