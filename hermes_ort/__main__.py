"""hermes: the command line. argparse lives here only; everything else takes plain values."""
from __future__ import annotations

import argparse
import sys

from .errors import HermesError
from .memory import format_bytes


def cmd_split(args) -> None:
    from .split import SplitRequest, split_model

    manifest = split_model(args.model, args.out, SplitRequest(stages=args.stages, cuts=tuple(args.cut or ())))
    print(f"split {args.model}: {len(manifest.stages)} stages, {format_bytes(manifest.bytes)} -> {args.out}")
    for s in manifest.stages:
        print(f"  {s.name:<12} {format_bytes(s.bytes):>11}  {len(s.inputs)} in, {len(s.outputs)} out")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hermes", description="Stream Transformer models through ONNX Runtime "
                                "one block at a time, within a memory budget.")
    sub = p.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="cut any ONNX model into a model directory of stages")
    split.add_argument("model", help="an .onnx file (external data beside it is read tensor by tensor)")
    split.add_argument("--out", required=True, help="model directory to write")
    split.add_argument("--stages", type=int, help="cut into N stages balanced by weight bytes")
    split.add_argument("--cut", action="append", metavar="TENSOR",
                       help="cut after this tensor (repeat, in order); overrides the automatic choice")
    split.set_defaults(func=cmd_split)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except HermesError as e:
        print(f"hermes: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
