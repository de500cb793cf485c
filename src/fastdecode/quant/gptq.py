"""GPTQ for int4 groups (recipe suffix ``-gptq``): scale, zero and codes chosen against
each linear's input moments on calibration tokens its caller passes, stored as
Int4Linear's format (the algorithm and its settings: docs/quant.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .int4 import pack_int4, padded_width, quantize_int4, round_params

CALIB_TOKENS = 32768
CALIB_SEQ = 512
DAMP = 0.1
ROUNDS = 3
MOMENT_BYTES = 2 << 30  # input moments held at once; more targets take several passes
SEQS_PER_PASS = 8  # calibration sequences a forward pass takes at once
_BLOCK = 128  # columns per lazy GPTQ update
_REFIT_ELEMENTS = 1 << 25  # rows per least-squares chunk: about this many of [rows, in, groups]


class _PassDone(Exception):  # raised by the hook of a pass's last linear
    pass


@torch.no_grad()
def input_moments(model, names: list[str], tokens: torch.Tensor,
                  seq_len: int = CALIB_SEQ) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (float32 [in, in]) of the inputs of the linears ``names`` over ``tokens`` in
    sequences of ``seq_len``; a pass stops at the last of them."""
    if tokens.numel() < seq_len:
        raise ConfigError(f"calibration needs at least {seq_len} tokens, got {tokens.numel()}")
    mods = dict(model.named_modules())
    acc = {n: torch.zeros(mods[n].in_features, mods[n].in_features, device=model.device)
           for n in names}
    count = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            acc[name].addmm_(x.T, x)
            count[name] += x.shape[0]
            if name == names[-1]:
                raise _PassDone
        return hook

    handles = [mods[n].register_forward_pre_hook(hook_for(n)) for n in names]
    n_seq = tokens.numel() // seq_len
    seqs = tokens[:n_seq * seq_len].reshape(n_seq, seq_len).to(model.device)
    try:
        for s in range(0, n_seq, SEQS_PER_PASS):
            try:
                model.forward_batch(seqs[s:s + SEQS_PER_PASS])
            except _PassDone:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: acc[n] / count[n] for n in names}


def moment_batches(model, names: list[str], budget: int = MOMENT_BYTES) -> list[list[str]]:
    """``names`` cut into consecutive runs whose float32 moments fit in ``budget`` bytes."""
    mods = dict(model.named_modules())
    batches: list[list[str]] = []
    used = 0
    for n in names:
        size = mods[n].in_features ** 2 * 4
        if not batches or used + size > budget:
            batches.append([])
            used = 0
        batches[-1].append(n)
        used += size
    return batches


@torch.no_grad()
def gptq_int4(w: torch.Tensor, moments: torch.Tensor, group_size: int, *,
              damp: float = DAMP, rounds: int = ROUNDS, param_dtype: torch.dtype | None = None):
    """w [out, in], moments H [in, in] -> (packed, scale, zero) as ``quantize_int4``."""
    out_f, in_f = w.shape
    p, g = padded_width(in_f, group_size), group_size
    dtype = param_dtype or w.dtype
    H = moments.float().to(w.device)
    diag = H.diagonal()
    live = diag > 0
    if not live.any():  # no calibration signal at all: the data-free fit
        return quantize_int4(w, group_size, param_dtype=dtype)
    reg = damp * diag[live].mean()
    scale, zero = quantize_int4(w, g, importance=diag + reg, param_dtype=dtype)[1:]
    H = F.pad(H, (0, p - in_f, 0, p - in_f))  # the objective: padding weighs nothing
    H.diagonal()[:in_f] += reg
    W = F.pad(w.float(), (0, p - in_f))
    order = torch.argsort(H.diagonal()[:in_f], descending=True)
    order = torch.cat((order, torch.arange(in_f, p, device=w.device)))  # padding last
    Hc = H[order][:, order]
    Hc.diagonal()[in_f:] = 1.0  # decoupled padding columns keep the factorisation defined
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hc)), upper=True)
    best = None
    for _ in range(rounds):
        q = torch.empty(out_f, p, dtype=torch.uint8, device=w.device)
        q[:, order] = _gptq_codes(W[:, order], U, scale[:, order // g], zero[:, order // g])
        for cand in ((q, scale, zero), _refit(W, H, q, scale, zero, g, dtype)):
            err = _output_error(W, H, *cand, g)
            if best is None:
                best = (err, *cand)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]),
                        *(torch.where(better[:, None], new, old)
                          for new, old in zip(cand, best[1:])))
        scale, zero = best[2], best[3]
    return pack_int4(best[1]), best[2], best[3]


def _gptq_codes(W, U, S, Z):
    """Codes of W [out, n] (columns in GPTQ order), each rounding error spread over the
    later columns through U, the upper Cholesky factor of H⁻¹; S, Z: per-column."""
    W = W.clone()
    n = W.shape[1]
    q = torch.empty_like(W, dtype=torch.uint8)
    for b0 in range(0, n, _BLOCK):
        b1 = min(b0 + _BLOCK, n)
        err = torch.empty(W.shape[0], b1 - b0, device=W.device)
        for i in range(b0, b1):
            s, z = S[:, i], Z[:, i]
            qi = torch.round((W[:, i] - z) / s + 8).clamp(0, 15)
            q[:, i] = qi.to(torch.uint8)
            e = (W[:, i] - ((qi - 8) * s + z)) / U[i, i]
            W[:, i:b1] -= e[:, None] * U[i, i:b1][None]
            err[:, i - b0] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return q


def _dequant(q, scale, zero, g):
    return ((q.float() - 8).unflatten(1, (-1, g)) * scale[..., None] + zero[..., None]).flatten(1)


def _output_error(W, H, q, scale, zero, g):
    """Per row: (w - ŵ) H (w - ŵ)ᵀ."""
    d = _dequant(q, scale, zero, g) - W
    return ((d @ H) * d).sum(1)


def _refit(W, H, q, scale, zero, g, dtype):
    """Per row, the (scale, zero) of all groups minimising (w - ŵ) H (w - ŵ)ᵀ given the codes
    (least squares in 2G unknowns); rows without a finite positive solution keep theirs."""
    out_f, p = W.shape
    G = p // g
    H4 = H.reshape(G, g, G, g)
    Hsum = H4.sum(-1)  # [G, g, G]: each column against each group's column sum
    new_s, new_z = scale.clone(), zero.clone()
    rows = max(1, _REFIT_ELEMENTS // (p * G))
    eye = torch.eye(2 * G, device=W.device)
    for r in range(0, out_f, rows):
        c = (q[r:r + rows].float() - 8).reshape(-1, G, g)
        Mss = torch.einsum("rcj,rcjd->rcd", c, torch.einsum("rdk,cjdk->rcjd", c, H4))
        Msz = torch.einsum("rcj,cjd->rcd", c, Hsum)
        Mzz = Hsum.sum(1).expand(c.shape[0], G, G)
        M = torch.cat((torch.cat((Mss, Msz), 2), torch.cat((Msz.transpose(1, 2), Mzz), 2)), 1)
        M = M + 1e-6 * M.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
        hw = (W[r:r + rows] @ H).reshape(-1, G, g)
        theta = torch.linalg.solve(M, torch.cat(((c * hw).sum(-1), hw.sum(-1)), 1))
        ok = torch.isfinite(theta).all(1) & (theta[:, :G] > 0).all(1)
        new_s[r:r + rows][ok], new_z[r:r + rows][ok] = theta[ok, :G], theta[ok, G:]
    return (q, *round_params(new_s, new_z, dtype))
