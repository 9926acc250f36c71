"""The exporter (the export extra: torch, transformers): a transformers model as exact per-block ONNX stages
plus manifest.json, checked against torch before it is published. `hermes export`; `python -m export` in a checkout."""
