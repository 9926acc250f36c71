"""python -m export SOURCE --out DIR [--seed N]: a model as exact per-block ONNX stages plus manifest.json."""
from __future__ import annotations

import argparse
import sys

from hermes_ort.errors import HermesError
from hermes_ort.memory import format_bytes

from .build import export_model
from .configs import NAMED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("source", help=f"a name ({', '.join(NAMED)}) or a local transformers model folder")
    parser.add_argument("--out", required=True, help="model directory to create (replaced if it is one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and check inputs")
    parser.add_argument("--no-simplify", dest="simplify", action="store_false",
                        help="skip onnxsim (by default each stage graph keeps onnxsim's result when it has fewer nodes)")
    args = parser.parse_args(argv)
    try:
        r = export_model(args.source, args.out, seed=args.seed, simplify=args.simplify)
    except HermesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.source}: {len(r.manifest.stages)} stages, {format_bytes(r.manifest.bytes)}, "
          f"max diff {r.max_diff:.2e} vs torch, {r.seconds:.1f} s -> {r.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
