"""The fused decode step for CUDA: Triton kernels launched over static buffers and
captured as one CUDA graph (``--compile graphs``, ``--kernels fused``). See step.py."""

from .options import FusedOptions
from .step import FusedStep, unsupported_reason

__all__ = ["FusedStep", "FusedOptions", "unsupported_reason"]
