"""cdds-fast: CDDS cross-modal alignment loss for open_clip, with Triton kernels."""
__version__ = "0.1.0"
