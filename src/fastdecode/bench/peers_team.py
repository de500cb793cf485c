"""The team's StreamingLLM as a transformers peer (#26, the study): keys held before
RoPE and re-rotated at their slots each step, start + recent by concatenation; ``team_nll``
is their token-by-token perplexity loop (docs/study.md, "Peers"; tests/test_study_peers.py)."""

from __future__ import annotations

import torch


class _Rotary:
    """cos/sin of the model's own rotary embedding at chosen positions (float32)."""

    def __init__(self, model):
        self.emb = model.base_model.rotary_emb
        self.cos = self.sin = None

    def at(self, positions: torch.Tensor):
        x = torch.empty(0, device=positions.device)
        cos, sin = self.emb(x, positions[None])
        return cos[0, None].float(), sin[0, None].float()  # [1, L, rotary_dim]

    @staticmethod
    def apply(x, cos, sin):
        """x [B, H, L, D] rotated (on its first rotary_dim dims) by the given angles."""
        rd = cos.shape[-1]
        xr, rest = x[..., :rd].float(), x[..., rd:]
        half = torch.cat((-xr[..., rd // 2:], xr[..., :rd // 2]), -1)
        return torch.cat(((xr * cos + half * sin).to(x.dtype), rest), -1)


def _pos_shift_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PosShiftLayer(DynamicLayer):
        """Keys held before RoPE; each call returns every key rotated at its slot 0..L-1."""

        def __init__(self, rotary: _Rotary):
            super().__init__()
            self.rotary = rotary

        def update(self, key_states, value_states, *args, **kwargs):
            r = self.rotary
            raw = r.apply(key_states, r.new_cos, -r.new_sin)  # undo the model's rotation
            super().update(raw, value_states)
            return r.apply(self.keys, r.cos, r.sin), self.values

    return PosShiftLayer


class TeamStreaming:
    """The team's StreamingLLM decode (see the module doc): ``step(ids)`` -> last logits."""

    def __init__(self, model, sink: int, window: int, lazy_every: int = 1):
        from transformers.cache_utils import Cache

        self.model, self.S, self.W, self.R = model, sink, window, lazy_every
        self.rotary = _Rotary(model)
        layer = _pos_shift_layer_class()
        n = model.config.num_hidden_layers
        self.cache = Cache(layers=[layer(self.rotary) for _ in range(n)])

    def held(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        held, q = self.held(), ids.numel()
        pos = torch.arange(held, held + q, device=ids.device)
        r = self.rotary
        r.cos, r.sin = r.at(torch.arange(held + q, device=ids.device))
        r.new_cos, r.new_sin = r.cos[:, held:], r.sin[:, held:]
        out = self.model(input_ids=ids.reshape(1, q), position_ids=pos[None],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.prune(self.S + self.W + (self.R if q == 1 else 1))
        return out.logits[0, -1]

    def prune(self, limit: int) -> None:
        """Start + recent by concatenation once ``limit`` tokens are held."""
        if self.held() < limit:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat((t[..., :self.S, :], t[..., -self.W:, :]), -2))


@torch.no_grad()
def team_nll(model, ids: torch.Tensor, *, sink: int, window: int, lazy_every: int = 1):
    """Their perplexity loop: feed one token, score the next, prune; nll per token."""
    import torch.nn.functional as F

    team = TeamStreaming(model, sink, window, lazy_every)
    ids = ids.to(model.device)
    return torch.stack([F.cross_entropy(team.step(ids[t:t + 1]).float(), ids[t + 1])
                        for t in range(ids.numel() - 1)]).double().cpu().numpy()
