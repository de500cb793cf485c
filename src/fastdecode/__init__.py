"""fastdecode: fast, faithful batch-1 decoding of RoPE decoder LLMs."""

__version__ = "0.1.0"
