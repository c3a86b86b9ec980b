"""WSSS pseudo masks (Text2Mask, the paper's first task), stage by stage:

    prompts.py    1. image-level labels -> one composed prompt, token spans
    predictor.py  2. VAE encode, noise at t, one conditional UNet pass, attention capture
    propagate.py  3. SelfCross = Self . (Self . (M * Cross)), background (tau - max)^p, labels
    refine.py     4. dense CRF, training mask with 255 where unsure
    write.py      5. index PNGs
    run.py        the dataset run: plugs the model step into the shared batch runner
"""
