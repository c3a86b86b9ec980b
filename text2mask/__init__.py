"""text2mask: pixel-level pseudo masks from image-level labels with Stable Diffusion attention.

    from text2mask import Text2Mask
    t2m = Text2Mask.from_pretrained("CompVis/stable-diffusion-v1-4", "voc")
    result = t2m("photo.jpg", ["horse", "person"])   # .labels, .scores, .crf, .mask
"""
__version__ = "0.1.0"

__all__ = ["Text2Mask", "MaskConfig", "MaskResult", "__version__"]


def __getattr__(name):
    # Lazy: CRF worker processes import text2mask.* and must not pay for torch.
    if name == "Text2Mask":
        from .wsss.predictor import Text2Mask
        return Text2Mask
    if name in ("MaskConfig", "MaskResult"):
        from .wsss import result
        return getattr(result, name)
    raise AttributeError(name)
