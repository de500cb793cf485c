"""int4 distillation (recipe suffix ``-kd``): GPTQ, then each group's scale and zero and one
offset per code tuned against the whole model's KL to the unquantized teacher, because
GPTQ's per-linear objective stops paying at g128 (docs/quant.md, records
perf/results/h100-kd-exp-*.json)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .int4 import Int4Linear, pack_int4, round_params, unpack_int4

SHARES = (245760, 73728)  # calibration tokens from each of eval.calibration.CALIBRATION
EPOCHS = 6
BATCH = 8
SEQ = 512
LR_SCALE = 1e-4  # Adam, scale and zero
LR_CODES = 2e-2  # Adam, the code offsets (in code levels)


class _Trainable(nn.Module):
    """An Int4Linear in float32 with trainable scale, zero and code offsets; the forward
    uses what ``store`` will write."""

    def __init__(self, m: Int4Linear):
        super().__init__()
        self.in_features, self.group_size = m.in_features, m.group_size
        self.dtype = m.scale.dtype
        self.register_buffer("q", unpack_int4(m.weight).to(torch.int8) - 8)  # GPTQ's codes
        self.scale = nn.Parameter(m.scale.detach().float().clone())
        self.zero = nn.Parameter(m.zero.detach().float().clone())
        self.offset = nn.Parameter(torch.zeros_like(self.q, dtype=torch.float32))
        self.bias = None if m.bias is None else m.bias.detach().float()

    def codes(self) -> torch.Tensor:
        """q - 8 with the rounded offsets (straight through), in -8..7."""
        r = self.offset + (torch.round(self.offset) - self.offset).detach()
        return (self.q + r).clamp(-8, 7)  # int8 + float32: float32

    def params(self):
        """(scale, zero) as stored (straight through)."""
        s, z = round_params(self.scale.detach(), self.zero.detach(), self.dtype)
        return self.scale + (s - self.scale).detach(), self.zero + (z - self.zero).detach()

    def forward(self, x):
        s, z = self.params()
        out_f, p = self.q.shape
        w = (self.codes().view(out_f, -1, self.group_size) * s[..., None] + z[..., None])
        return F.linear(x, w.view(out_f, p)[:, :self.in_features], self.bias)

    @torch.no_grad()
    def store(self, target: Int4Linear) -> int:
        """Write codes, scale and zero into ``target``; returns how many codes moved."""
        s, z = round_params(self.scale, self.zero, self.dtype)
        codes = self.codes()
        target.weight.copy_(pack_int4((codes + 8).to(torch.uint8)))
        target.scale.copy_(s.to(target.scale.dtype))
        target.zero.copy_(z.to(target.zero.dtype))
        return int((codes != self.q).sum())


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), in float32."""
    lt = F.log_softmax(teacher_logits.float(), -1)
    ls = F.log_softmax(student_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def _student(model, names):
    """A float32 copy of ``model`` whose int4 linears ``names`` are _Trainable."""
    student = copy.deepcopy(model).float().requires_grad_(False)
    trainable = {}
    for n in names:
        trainable[n] = _Trainable(model.get_submodule(n))
        student.set_submodule(n, trainable[n])
    return student, trainable


def distill_int4(model, teacher, tokens: torch.Tensor, *, epochs: int = EPOCHS,
                 batch: int = BATCH, seq: int = SEQ, lr_scale: float = LR_SCALE,
                 lr_codes: float = LR_CODES, seed: int = 0, progress: bool = False) -> dict:
    """Tune ``model``'s Int4Linear modules in place against ``teacher`` (read only) on
    ``tokens`` [N] in sequences of ``seq``; returns steps, first/last epoch KL, codes moved."""
    if tokens.numel() < seq:
        raise ConfigError(f"distillation needs at least {seq} calibration tokens, got "
                          f"{tokens.numel()}")
    if epochs < 1 or batch < 1:
        raise ConfigError(f"distillation needs epochs >= 1 and batch >= 1, got {epochs}, "
                          f"{batch}")
    names = [n for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    if not names:
        raise ConfigError("distillation: the model has no int4 linears")
    dev = model.device
    seqs = tokens[: tokens.numel() // seq * seq].view(-1, seq).to(dev)
    if any(p.dtype != torch.float32 for p in teacher.parameters()):
        teacher = copy.deepcopy(teacher).float()  # only read, so a float32 one is used as is
    student, trainable = _student(model, names)
    opt = torch.optim.Adam([
        {"params": [p for t in trainable.values() for p in (t.scale, t.zero)], "lr": lr_scale},
        {"params": [t.offset for t in trainable.values()], "lr": lr_codes}])
    per_epoch = math.ceil(len(seqs) / batch)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    from tqdm import tqdm

    bar = tqdm(total=steps, disable=not progress, desc="distilling int4", unit="step",
               leave=False, dynamic_ncols=True, mininterval=1.0)
    kls = []
    try:
        for _ in range(epochs):
            total = 0.0
            for b in torch.randperm(len(seqs), generator=gen).split(batch):
                toks = seqs[b.to(dev)]
                with torch.no_grad():
                    target = teacher.forward_batch(toks)
                loss = kl_to_teacher(student.forward_batch(toks), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for t in trainable.values():
                        t.offset.clamp_(-1, 1)
                kl = loss.item()
                total += kl
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4f}", refresh=False)
            kls.append(total / per_epoch)
    finally:
        bar.close()
    moved = sum(t.store(model.get_submodule(n)) for n, t in trainable.items())
    return {"steps": steps, "kl_first_epoch": kls[0], "kl_last_epoch": kls[-1],
            "codes_moved": moved}
