"""The Ray layer: one module per stage (`run(cfg) -> Path`, `main(argv)`), wired together by `cli.py`."""
