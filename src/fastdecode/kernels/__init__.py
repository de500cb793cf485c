"""Leaf Triton kernels that sit at the attention layer (they import only torch, triton and
fastdecode.errors): the flash prefill attention (:mod:`.flash_prefill`)."""
