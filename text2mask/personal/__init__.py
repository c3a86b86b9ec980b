"""Personalized referring segmentation (paper §5.3): find MY item in a scene photo from a
few photos of it (a learned concept) and a description.

Stages (PERSONALIZED.md §3) and where they live:

    concept.py    Custom Diffusion / textual inversion artefacts (formats A, B, C, T; a
                  multi-concept folder = one Concept per token): load and validate,
                  check, apply into the model's weights, restore bitwise
    train.py      the built-in Custom Diffusion trainer (``text2mask personalize``):
                  seeded per step, fingerprinted checkpoints, the base K/V restored
    query.py      3. the prompt "<token> <class>" and the spans an instance map averages over
    refer.py      1-3, 7: noised latent, object area, instance maps (SelfCross), masks;
                  the API ``Referrer`` / ``Query`` / ``ReferResult``
    spectral.py   4. normalized cuts of Self inside the object area -> K segments (K
                  given, or by the eigengap)
    assign.py     5-6. correlation c[i, s]; bf (argmax) and af (Hungarian, per af group)
    run.py        the dataset run on the shared batch engine (``text2mask refer --data-root``)
    visualize.py  pictures: photo, segments, chosen mask per query, correlation matrix

Data: ``text2mask.data.personal``; scores: ``text2mask.evaluation.referring``; the
user's page: docs/personalized.md.

    from text2mask.personal import Concept, Query, Referrer
    referrer = Referrer.from_pretrained("CompVis/stable-diffusion-v1-4")
    result = referrer("scene.jpg", [Query(Concept.load("concepts/my-mug"), "a white mug filled with cola")],
                      class_name="mug", segments=3)
    result.masks[0]      # (H, W) bool: my mug
"""
from .concept import Concept
from .refer import Query, ReferConfig, Referrer, ReferResult

__all__ = ["Concept", "Query", "ReferConfig", "Referrer", "ReferResult"]
