"""mla-seam: one MLA adapter file for Megatron-LM, its hook patches, and the tools that move them."""

__version__ = "0.2.0"
