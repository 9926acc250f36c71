"""`python -m export` in a checkout, as before: the exporter itself ships in the wheel as `hermes_ort_export`
(`hermes export`, the export extra)."""
