"""Stable Diffusion as every method uses it: loading (``loading``) and attention capture
(``capture``). Model I/O lives here only."""
