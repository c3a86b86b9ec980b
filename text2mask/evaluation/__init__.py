"""Evaluation, one place for every method: accumulate per sample, then compute (in the
manner of mmsegmentation's ``IoUMetric``); keys in the field's vocabulary, values in percent.

    semantic.py    confusion-matrix mIoU / aAcc / mAcc (WSSS pseudo masks; SLiMe's confusion form)
    parts.py       SLiMe's per-image protocol (IoU per class on the images that contain it)
    referring.py   per-triplet bf/af accuracy and mIoU (personalized referring segmentation)
    fewshot.py     per-class IoU pooled over episodes, mIoU per fold, FB-IoU (HSNet protocol)
"""
