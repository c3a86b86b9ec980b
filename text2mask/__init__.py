"""text2mask: pixel-level pseudo masks from image-level labels with Stable Diffusion attention."""
__version__ = "0.1.0"
