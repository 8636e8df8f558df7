import base64
import io
import math
import re

import numpy as np
from PIL import Image

from personalization.evaluation.report import write_report
from personalization.schema import encode_mask, encode_png


def test_report_is_self_contained_with_table_values(tmp_path):
    summary = {
        "pretrained": {"classification/pr_auc": 0.3125, "retrieval/ndcg": 0.7},
        "personalized": {"classification/pr_auc": 0.4375, "retrieval/ndcg": math.nan},
        "per_instance": {
            "mug_1": {"pretrained": {"classification/pr_auc": 0.25}, "personalized": {"classification/pr_auc": 0.5}}
        },
    }
    image = encode_png(np.full((32, 32, 3), 80, dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 8:20] = True
    path = write_report(
        tmp_path / "out" / "report.html",
        summary,
        loss_history={"mug_1": [2.0, 1.5, 1.2]},
        pr_curves={"pretrained": {"mug_1": (np.array([0.5, 1.0]), np.array([1.0, 0.0]))}},
        sample_images=[("a sample", image)],
        mask_examples=[("mug_1 test", image, encode_mask(mask))],
        notes=["images are noise with tiny models"],
    )
    text = path.read_text()
    for value in ("0.3125", "0.4375", "0.1250", "0.2500", "0.5000", "n/a", "mug_1", "retrieval/ndcg"):
        assert value in text
    assert "images are noise with tiny models" in text
    assert 'src="http' not in text  # nothing external
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4  # loss plot, one PR plot, one sample, one mask overlay
    decoded = [Image.open(io.BytesIO(base64.b64decode(data))) for data in images]
    assert all(im.size[0] > 0 for im in decoded)
    overlay = np.asarray(decoded[-1].convert("RGB"))
    assert overlay[10, 10, 0] > overlay[10, 10, 1]  # inside the mask: tinted red
    assert tuple(overlay[0, 0]) == (80, 80, 80)  # outside: untouched


def test_report_without_optional_parts(tmp_path):
    path = write_report(tmp_path / "r.html", {})
    assert "No metrics" in path.read_text()


def test_load_evaluation_outputs_feeds_write_report(tmp_path):
    import json

    from personalization.evaluation.report import load_evaluation_outputs

    (tmp_path / "examples").mkdir()
    image = encode_png(np.zeros((16, 16, 3), dtype=np.uint8))
    (tmp_path / "examples" / "i.png").write_bytes(image)
    (tmp_path / "examples" / "m.png").write_bytes(encode_mask(np.eye(16, dtype=bool)))
    (tmp_path / "mask_examples.json").write_text(
        json.dumps([{"caption": "c", "image": "examples/i.png", "mask": "examples/m.png"}])
    )
    (tmp_path / "pr_curves.json").write_text(json.dumps({"pretrained": {"a": {"precision": [1.0], "recall": [0.5]}}}))
    loaded = load_evaluation_outputs(tmp_path)
    assert loaded["mask_examples"][0][:2] == ("c", image)
    assert loaded["pr_curves"]["pretrained"]["a"][1].tolist() == [0.5]
    text = write_report(tmp_path / "r.html", {}, **loaded).read_text()
    assert text.count("data:image/png;base64,") == 2
