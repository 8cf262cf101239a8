"""otmel: multimodal entity linking with OT-MEL at cluster scale."""

__version__ = "0.1.0"
