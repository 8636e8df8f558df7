"""Evaluation of an encoder on the four personalized tasks.

- :mod:`.classification`: PR-AUC of "is this the user's object?" from max cosine to the real train images.
- :mod:`.retrieval`: NDCG / MRR / top-10 of the instance's test images against the train gallery.
- :mod:`.dense`: patch-similarity mask and box prediction (the detection/segmentation predictor).
- :mod:`.coco`: COCO AP for those predictions via pycocotools (``bbox`` and ``segm``).
- :mod:`.extract`: ``FeatureExtractor``, one encoder (+ adapter) applied to PNG batches (wrapped by a Ray actor).
- :mod:`.images`: the evaluation image sets (ids without pixels) and a streamed reader of the rows needed.
- :mod:`.measure`: ``evaluate_encoder``, one encoder's compact per-instance results, computed where its features are.
- :mod:`.outputs`: per-(model, instance) result folders and the summary files (metrics.json, ...) built from them.
- :mod:`.report`: one self-contained ``report.html``.

Everything here is numpy + scikit; no Ray. ``pipelines/evaluate.py`` runs ``evaluate_encoder`` in its actors.
"""
