"""Evaluation of an encoder on the four personalized tasks.

- :mod:`.classification`: PR-AUC of "is this the user's object?" from max cosine to the real train images.
- :mod:`.retrieval`: NDCG / MRR / top-10 of the instance's test images against the train gallery.
- :mod:`.dense`: patch-similarity mask and box prediction (the detection/segmentation predictor).
- :mod:`.coco`: COCO AP for those predictions via pycocotools (``bbox`` and ``segm``).
- :mod:`.extract`: ``FeatureExtractor``, one encoder (+ adapter) applied to PNG batches (wrapped by a Ray actor).
- :mod:`.report`: one self-contained ``report.html``.

Everything here is numpy + scikit; no Ray. ``pipelines/evaluate.py`` extracts features and calls these.
"""
