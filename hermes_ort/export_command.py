"""`hermes export`: the exporter (hermes_ort_export, the export extra) behind the hermes command."""
from __future__ import annotations

import sys

EXPORT_EXTRA = ("torch", "transformers", "tqdm", "onnxsim")  # what `pip install "hermes-ort[export]"` adds


def cmd_export(argv: list[str]) -> int:
    """hermes export: the exporter parses its own arguments (those of `python -m export` in a checkout); it is
    imported only here, as it needs the export extra."""
    try:
        from hermes_ort_export.__main__ import main as export
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXPORT_EXTRA:
            raise
        print(f'hermes export: error: needs {e.name}, from the export extra: pip install "hermes-ort[export]"',
              file=sys.stderr)
        return 2
    return export(argv)
