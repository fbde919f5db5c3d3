"""tokpost_fast: fused-kernel implementation of 'Image Tokenizer Needs Post-Training' (RobusTok)."""

__version__ = "0.1.0"
