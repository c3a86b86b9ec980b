"""Evaluation, one place for every method: accumulate per sample, then compute.

    semantic.py   confusion-matrix mIoU / aAcc / mAcc (WSSS; SLiMe's confusion form)
"""
