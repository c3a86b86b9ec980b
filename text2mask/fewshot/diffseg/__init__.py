"""DiffSeg: few-shot segmentation on Kandinsky 2.2 attention, with perceptual attention
and spatial control (Shi et al., ACM MM 2024). No code or weights of the authors are
public; this is text2mask's own implementation of the paper (DIFFSEG.md, docs/diffseg.md).

Stage map (DIFFSEG.md §3), module by module:

    1. episodes     ``fewshot/episodes.py``   HSNet manifests and training draws, as DiffewS
    2. supports     ``model.py`` / ``stages``  S = I_s ⊗ M_s; L_s = MoVQ(2S − 1), E_m = CLIP(S); k-shot mean
    3. query        ``model.py`` / ``stages``  L_q = MoVQ(I_q); z_t = √ᾱ L_q + √(1−ᾱ) ε, t = 100; edges
    4. UNet + SCM   ``scm.py``, ``modeling/added_kv.py``  one pass conditioned on E_m; SCM edits the
                                               up path's skips; every added-KV layer's maps captured
    5. M_a          ``stages.fuse_maps``       cross = context mass, self = renormalised spatial slice,
                                               M_a = minmax(M_self · M_cross) without 4096² matrices
    6. PAM          ``pam.py``                 attention over L_q, L_s, M_a -> L_pre
    7. decode       ``model.py`` / ``stages``  MoVQ.decode(L_pre) -> score, > 0.5
    score           ``evaluation/fewshot.py``  unchanged

Around them: ``edges.py`` (Canny, HED), ``checkpoint.py`` (scm/pam safetensors +
fewshot.json), ``train.py`` (SGD + StepLR by epoch, feature cache, accelerate),
``evaluate.py`` (the batch-engine method), ``seeds.py`` (mean ± std over seeded manifests).
"""
