"""What a Ray task worker loads: a worker imports the module of the function it runs, so the stages whose tasks
need no model keep torch out of their import chain (each worker process would spend ~2 s of CPU loading it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["pipelines.cutpaste", "pipelines.ingest", "personalization.contrastive.negatives"])
def test_task_modules_do_not_load_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{module} loads torch: {loaded[:200]}"
