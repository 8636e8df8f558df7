"""Contrastive fine-tuning: triplet sampling from ids (``triplets``), the training data (``data``), negatives and
released positives (``negatives``, ``released``), losses (``losses``), the plain-PyTorch step (``step``) and loop
(``fit``).

Import from the modules: the package itself imports nothing, so a process that needs only the id-level code (the
driver's negatives and released-positives checks in pipelines/common.py, which every Ray task worker of
``pipelines`` imports) does not load torch (~2 s of CPU per worker process).
"""
