"""GPT-NeoX / Pythia: LayerNorm, parallel residual, partial rotary, GELU MLP, biases,
untied head."""

from __future__ import annotations

from ...errors import ModelLoadError
from .base import Family, common_hf_config, common_hf_fields


class GPTNeoX(Family):
    name = "gpt_neox"
    norm = "layer"
    mlp = "gelu"
    parallel_residual = True
    bias = True

    def spec_fields(self, cfg: dict) -> dict:
        if not cfg.get("use_parallel_residual", True):
            raise ModelLoadError("GPT-NeoX with use_parallel_residual=false is not supported")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelLoadError(f"GPT-NeoX hidden_act {act!r} is not supported (only 'gelu')")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        rotary_pct = cfg.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
        theta = cfg.get("rotary_emb_base", rope.get("rope_theta", 10000.0))
        return dict(common_hf_fields(cfg), num_heads=heads, num_kv_heads=heads,
                    rotary_dim=int(cfg["hidden_size"] // heads * rotary_pct),
                    rope_theta=float(theta), norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))

    def hf_config(self, spec) -> dict:
        return dict(common_hf_config(spec), model_type=self.name, hidden_act="gelu",
                    rotary_pct=spec.rotary_dim / spec.head_dim, rotary_emb_base=spec.rope_theta,
                    layer_norm_eps=spec.norm_eps, use_parallel_residual=True)

    def hf_to_canonical(self, spec, hf: dict) -> dict:
        H, nh, D = spec.hidden_size, spec.num_heads, spec.head_dim
        out = {"embed.weight": hf["gpt_neox.embed_in.weight"],
               "norm.weight": hf["gpt_neox.final_layer_norm.weight"],
               "norm.bias": hf["gpt_neox.final_layer_norm.bias"],
               "lm_head.weight": hf["embed_out.weight"]}
        for i in range(spec.num_layers):
            p, o = f"gpt_neox.layers.{i}.", f"layers.{i}."
            for a, b in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                         ("attention.dense", "attn.out"), ("mlp.dense_h_to_4h", "mlp.up"),
                         ("mlp.dense_4h_to_h", "mlp.down")):
                out[o + b + ".weight"] = hf[p + a + ".weight"]
                out[o + b + ".bias"] = hf[p + a + ".bias"]
            # NeoX interleaves per head: [head][q|k|v][D]; canonical is [q heads|k heads|v heads].
            w = hf[p + "attention.query_key_value.weight"]
            b = hf[p + "attention.query_key_value.bias"]
            out[o + "attn.qkv.weight"] = w.view(nh, 3, D, H).transpose(0, 1).reshape(3 * nh * D, H)
            out[o + "attn.qkv.bias"] = b.view(nh, 3, D).transpose(0, 1).reshape(3 * nh * D)
        return out
