"""Few-shot segmentation: "segment things like these examples" (DiffewS, NeurIPS 2024).

Stage map (the paper's pipeline, module by module):

    1. episodes    ``episodes.py``    HSNet protocol: fold classes, seeded episodes, JSONL manifest
    2. encode      ``model.py``       photos squashed to R², masks nearest; VAE posterior mean (train: draws)
    3. support     ``diffews.py``     UNet on conv_in_ref([z_s ; z_ms]) at t = 1; every attn1 keeps K, V
    4. query       ``diffews.py``     UNet on z_q with attn1 over [query; supports] K, V; ẑ_m = −output
    5. decode      ``diffews.py``     VAE decode, uint8, mean RGB, > 0.25 · max, at the query's size
    6. score       ``evaluation/fewshot.py``  per-class pooled IoU, mIoU, FB-IoU, 4-fold mean

Around them: ``checkpoint.py`` (our layout, the released-layout importer), ``evaluate.py``
(the batch-engine method behind ``text2mask fewshot evaluate``), ``segment.py`` (one's
own photos), ``train.py`` (🤗 accelerate trainer), ``visual.py`` (episode pictures).
"""
