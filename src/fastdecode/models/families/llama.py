"""Llama (and SmolLM2): RMSNorm, sequential residual, SwiGLU, grouped-query attention,
full rotary, no biases, usually a tied head; read from Hugging Face directories and GGUF."""

from __future__ import annotations

import torch

from ...errors import ModelLoadError
from .base import Family, common_hf_config, common_hf_fields


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved for its rope; undo it (as transformers does).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


class Llama(Family):
    name = "llama"
    norm = "rms"
    mlp = "glu"
    parallel_residual = False
    bias = False
    gguf_arch = "llama"

    def spec_fields(self, cfg: dict) -> dict:
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if head_dim * heads != cfg["hidden_size"]:
            raise ModelLoadError("Llama configs with head_dim * heads != hidden_size "
                                 "are not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"Llama hidden_act {act!r} is not supported (only 'silu')")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
        if kind not in (None, "default"):
            raise ModelLoadError(f"rope scaling {kind!r} is not supported")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        return dict(common_hf_fields(cfg), num_heads=heads,
                    num_kv_heads=cfg.get("num_key_value_heads") or heads, rotary_dim=head_dim,
                    rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))

    def hf_config(self, spec) -> dict:
        return dict(common_hf_config(spec), model_type=self.name, hidden_act="silu",
                    num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                    rope_theta=spec.rope_theta, rms_norm_eps=spec.norm_eps)

    def hf_to_canonical(self, spec, hf: dict) -> dict:
        out = {"embed.weight": hf["model.embed_tokens.weight"],
               "norm.weight": hf["model.norm.weight"]}
        if not spec.tie_embeddings:
            out["lm_head.weight"] = hf["lm_head.weight"]
        for i in range(spec.num_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            out[o + "norm1.weight"] = hf[p + "input_layernorm.weight"]
            out[o + "norm2.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[o + "attn.qkv.weight"] = torch.cat(
                [hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
            out[o + "attn.out.weight"] = hf[p + "self_attn.o_proj.weight"]
            out[o + "mlp.up.weight"] = torch.cat(
                [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0)
            out[o + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
        return out

    def gguf_spec_fields(self, field, tensor_names) -> dict:
        vocab = field("llama.vocab_size")
        if not vocab:
            vocab = len(field("tokenizer.ggml.tokens") or ())
        if not vocab:
            raise ModelLoadError("GGUF metadata lacks 'llama.vocab_size' "
                                 "(and 'tokenizer.ggml.tokens')")
        heads = int(field("llama.attention.head_count", required=True))
        hidden = int(field("llama.embedding_length", required=True))
        return dict(
            vocab_size=int(vocab), hidden_size=hidden,
            num_layers=int(field("llama.block_count", required=True)), num_heads=heads,
            num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
            intermediate_size=int(field("llama.feed_forward_length", required=True)),
            rotary_dim=int(field("llama.rope.dimension_count", hidden // heads)),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position=int(field("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in tensor_names,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=field("tokenizer.ggml.eos_token_id"))

    def gguf_to_canonical(self, spec, tensors) -> dict:
        state = {"embed.weight": tensors["token_embd.weight"],
                 "norm.weight": tensors["output_norm.weight"]}
        if not spec.tie_embeddings:
            state["lm_head.weight"] = tensors["output.weight"]
        for i in range(spec.num_layers):
            g, o = f"blk.{i}.", f"layers.{i}."
            q = _unpermute(tensors[g + "attn_q.weight"], spec.num_heads)
            k = _unpermute(tensors[g + "attn_k.weight"], spec.num_kv_heads)
            state[o + "attn.qkv.weight"] = torch.cat([q, k, tensors[g + "attn_v.weight"]])
            state[o + "attn.out.weight"] = tensors[g + "attn_output.weight"]
            state[o + "mlp.up.weight"] = torch.cat([tensors[g + "ffn_gate.weight"],
                                                    tensors[g + "ffn_up.weight"]])
            state[o + "mlp.down.weight"] = tensors[g + "ffn_down.weight"]
            state[o + "norm1.weight"] = tensors[g + "attn_norm.weight"]
            state[o + "norm2.weight"] = tensors[g + "ffn_norm.weight"]
        return state
