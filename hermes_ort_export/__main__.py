"""hermes export SOURCE --out DIR [--random-weights [--seed N]] (or `python -m export` in a checkout): a model
as exact per-block ONNX stages plus manifest.json. SOURCE is a published model's table name (its weights from the Hugging Face cache or hub), a
Hugging Face repository id or a local transformers folder."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from hermes_ort.errors import HermesError
from hermes_ort.engine.memory import format_bytes
from hermes_ort.format.manifest import weights_note

from .build import export_model
from .configs import NAMED


def main(argv=None, prog: str = "hermes export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("source", help=f"a name ({', '.join(NAMED)}), a Hugging Face repository id or a local "
                                       "transformers model folder")
    parser.add_argument("--out", required=True, help="model directory to create (replaced if it is one)")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights of the named model's "
                        "shape instead of its published ones (for sizes and speed; marked in the manifest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and check inputs")
    parser.add_argument("--no-simplify", dest="simplify", action="store_false",
                        help="skip onnxsim (by default each stage graph keeps onnxsim's result when it has fewer nodes)")
    parser.add_argument("--bits", type=int, choices=[8, 4], help="then quantize the blocks to 8 or 4 bits "
                        "(LM head 8) as `hermes quantize` does; the checked fp32 export is not kept")
    args = parser.parse_args(argv)
    try:
        r = export_model(args.source, args.out if args.bits is None else scratch_for(args.out), seed=args.seed,
                         simplify=args.simplify, random_weights=args.random_weights)
        if args.bits is not None:
            quantized = quantize_into(r.directory, args.out, args.bits)
    except HermesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.source}{weights_note(r.manifest)}: {len(r.manifest.stages)} stages, {format_bytes(r.manifest.bytes)}, "
          f"max diff {r.max_diff:.2e} vs torch, {r.seconds:.1f} s -> {args.out}")
    if args.bits is not None:
        print(f"quantized to int{args.bits}: {format_bytes(quantized.bytes)}, drift {quantized.extra['drift']}")
    return 0


def scratch_for(out: str) -> Path:
    """Where the fp32 export is checked before quantizing: hidden beside the target."""
    return Path(out).parent / f".{Path(out).name}.fp32-{os.getpid()}"


def quantize_into(fp32: Path, out: str, bits: int):
    from hermes_ort.convert.quantize import QuantizeSettings, quantize_dir

    try:
        return quantize_dir(fp32, out, QuantizeSettings(bits=bits))
    finally:
        shutil.rmtree(fp32, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
