"""Leaf Triton kernels that sit at the attention layer (they import only torch, triton and
fastdecode.errors): the flash prefill attention (:mod:`.flash_prefill`), the prefill's key
rotary (:mod:`.prefill_rope`) and its parallel-residual LayerNorms (:mod:`.prefill_norm`)."""
