"""hermes: the command line. argparse lives here only; everything else takes plain values."""
from __future__ import annotations

import argparse
import sys
import warnings

from .commands import cmd_batched, cmd_cache, cmd_convert, cmd_generate, cmd_quantize, cmd_warm
from .errors import HermesError
from .export_command import cmd_export
from .serve.command import cmd_serve
from .stage_commands import cmd_plan, cmd_profile, cmd_run, cmd_split, cmd_update, cmd_verify


def add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="weight-only 8/4-bit stages with ORT's MatMulNBits, stage by stage")
    q.add_argument("model_dir", help="an fp32 model directory")
    q.add_argument("--out", required=True, help="model directory to write")
    q.add_argument("--bits", type=int, choices=[8, 4], default=4)
    q.add_argument("--block-size", type=int, default=32, help="values per scale along K (16-256, default 32)")
    q.add_argument("--accuracy-level", type=int, choices=[0, 4], default=0,
                   help="MatMulNBits arithmetic: 0 float32 (default), 4 int8 activations (fast 8-bit kernels)")
    q.add_argument("--head-bits", type=int, choices=[8, 4], default=8, help="bits of the LM head (default 8)")
    q.add_argument("--scheme", choices=["minmax", "symmetric"], default="minmax",
                   help="codes of the blocks' matrices: minmax (each block's own range, minimums added back; "
                   "default) or symmetric (no minimums); heads are always symmetric")
    q.set_defaults(func=cmd_quantize)


def add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="a GGUF file (llama, mistral, qwen2, qwen3, phi3, gemma3) to a model "
                          "directory, no torch needed")
    conv.add_argument("gguf", help="the .gguf file")
    conv.add_argument("--out", required=True, help="model directory to write (replaced only once it checks out)")
    conv.add_argument("--precision", choices=["native", "fp32", "int8", "int4"], default="native",
                      help="native keeps every quantized type with an exact form (Q2_K-Q8_0, IQ4) on ORT's "
                      "MatMulNBits (default); fp32 dequantizes; int8/int4 re-quantize the fp32 conversion as "
                      "hermes quantize does")
    conv.add_argument("--accuracy-level", type=int, choices=[0, 4], help="MatMulNBits arithmetic: 4 int8 "
                      "activations per 32-block, as llama.cpp computes (default for native), 0 float32, exact "
                      "(default for int8/int4)")
    conv.set_defaults(func=cmd_convert)
    serve = sub.add_parser("serve", help="an OpenAI-compatible server (the serve extra): every pass over the "
                           "streamed stages decodes every active request")
    serve.add_argument("model_dir")
    serve.add_argument("--budget", help="memory budget (bytes, 512MiB, 25%%); default: no limit")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--parallel", type=int, default=4, help="requests decoded together (clamped to what "
                       "the budget holds at --context)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    serve.add_argument("--prefill-chunk", type=int, default=512,
                       help="prompt positions per pass (a longer prompt rides several): bounds attention's memory")
    serve.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (default: env HERMES_API_KEY)")
    serve.add_argument("--context", type=int, help="positions of prompt + completion per request (default: "
                       "the model's, at most 1024); each request's KV cache is reserved for its own")
    serve.set_defaults(func=cmd_serve)


def add_generate(sub, budget_help: str) -> None:
    """hermes generate: text or token ids in, a KV cache through streamed stages."""
    gen = sub.add_parser("generate", help="text (or token ids) in, text out, with a KV cache through streamed "
                         "stages")
    gen.add_argument("model_dir")
    gen.add_argument("--prompt", help="text to continue (needs the model directory's tokenizer.json)")
    gen.add_argument("--prompts-file", help="one prompt per line, decoded together as one batch")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--ids", help="prompt token ids, comma-separated (prints ids)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--eos", type=int, help="with --ids: stop when this token id is produced")
    gen.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    gen.add_argument("--do-sample", action="store_true", help="sample (implied by the options below but "
                     "--repetition-penalty); default greedy")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int, help="same seed, same tokens")
    gen.add_argument("--budget", help=budget_help + " (default: a share of available memory)")
    gen.add_argument("--speculate", metavar="lookup|DRAFT_DIR",
                     help="verify proposals in one pass: 'lookup' (n-grams of the prompt and the text so far) or "
                          "a draft model directory with the same vocabulary, kept resident inside the budget")
    gen.add_argument("--draft-tokens", type=int, default=8, metavar="K",
                     help="with --speculate: the most proposals a pass verifies (adapts to the acceptance)")
    gen.set_defaults(func=cmd_generate)


def positive(text: str) -> int:
    """An argparse type: a count of positions or rows, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


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

    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--batch", type=int, default=1, help="batch size of synthetic inputs (default 1)")
    shape.add_argument("--sequence", type=int, default=128, help="sequence length of synthetic inputs")
    budget_help = "peak RSS to stay under: 400MiB, 2GB, or 25%% of the model's bytes"

    prof = sub.add_parser("profile", parents=[shape], help="measure load/run time and memory per stage")
    prof.add_argument("model_dir")
    prof.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    prof.add_argument("--decode", action="store_true", help="profile a one-token decoding step of --batch rows at "
                      "--max-length (default: the model's positions, at most 1024) into profile-decode[-bN].json")
    prof.add_argument("--max-length", type=int, help="context of the profiled decoding step")
    prof.add_argument("--prompt", type=positive, default=32, help="prompt positions of the measured prefill (with --decode)")
    prof.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="the pipeline plan for a budget, or the table over budgets")
    pl.add_argument("model_dir")
    pl.add_argument("--budget", help=budget_help)
    pl.add_argument("--cold", action="store_true", help="plan for files not in the page cache")
    pl.add_argument("--decode", action="store_true", help="plan generation: a one-token step, KV cache inside "
                    "the budget, predicted tokens/s")
    pl.add_argument("--batch", type=int, default=1, help="rows decoded together (with --decode)")
    pl.add_argument("--prompt", type=positive, default=32, help="prompt positions (with --decode)")
    pl.add_argument("--max-length", type=int, help="positions at the end of generation (default prompt + 256)")
    pl.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", parents=[shape], help="one inference within a budget")
    run.add_argument("model_dir")
    run.add_argument("--budget", help=budget_help + " (default: a share of available memory)")
    run.add_argument("--inputs", help=".npz of model inputs (default: synthetic inputs of --batch/--sequence)")
    run.add_argument("--out", help="write the outputs to this .npz")
    run.add_argument("--trace", help="write a Chrome trace-event JSON (Perfetto, chrome://tracing)")
    run.set_defaults(func=cmd_run)

    add_generate(sub, budget_help)
    add_convert(sub)
    add_quantize(sub)
    add_upkeep(sub)
    add_cluster(sub)
    sub.add_parser("export", add_help=False, help="a transformers model (a table name, a Hugging Face repository "
                   "or a local folder) as checked stages: hermes export NAME|REPO|FOLDER --out DIR (the export "
                   "extra; hermes export --help for its options)")
    return p


def add_upkeep(sub) -> None:
    """The commands that look after model directories: cache, warm, batched, verify, update."""
    cache = sub.add_parser("cache", help="models split on first use from .onnx files: list them or free them")
    cache.add_argument("action", choices=["ls", "clear"])
    cache.set_defaults(func=cmd_cache)
    warm = sub.add_parser("warm", help="read a model's weight files into the page cache in huge pages, which "
                                       "streamed stages map fastest (a copied or downloaded model is not)")
    warm.add_argument("model_dir")
    warm.set_defaults(func=cmd_warm)
    batched = sub.add_parser("batched", help="write the streamed matrices again, transposed, for decoding several "
                                             "rows at a time (2x faster blocks at batch 8; the bytes again on disk)")
    batched.add_argument("model_dir")
    batched.add_argument("--remove", action="store_true", help="delete the batched layout")
    batched.set_defaults(func=cmd_batched)
    verify = sub.add_parser("verify", help="check every file of a model directory against its manifest (sha256)")
    verify.add_argument("model_dir")
    verify.set_defaults(func=cmd_verify)
    update = sub.add_parser("update", help="replace a model directory by a new version atomically, copying only "
                                           "the files whose sha256 changed; open sessions keep their version")
    update.add_argument("model_dir")
    update.add_argument("new_dir", help="the new version (a model directory, checked whole first)")
    update.set_defaults(func=cmd_update)


def board(text: str):
    """An argparse type: NAME=BUDGET[,disk=MB/s][,speed=X]."""
    from .cluster.boards import BoardSpec

    try:
        return BoardSpec.parse(text)
    except HermesError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cluster(sub) -> None:
    """hermes cluster plan: which board runs which stage range (hermes_ort/cluster/)."""
    from .cluster.command import cmd_cluster_plan

    cluster = sub.add_parser("cluster", help="stage ranges on several boards (Ray: the ray extra)")
    actions = cluster.add_subparsers(dest="action", required=True)
    plan = actions.add_parser("plan", help="the fewest boards that keep every stage resident, else the slowest "
                                           "range balanced; prints the placement")
    plan.add_argument("model_dir")
    plan.add_argument("--board", type=board, action="append", required=True, metavar="NAME=BUDGET[,disk=MB/s]",
                      help="a board in pipeline order (repeat): budget as 2GiB, disk read speed (default 300), "
                           "speed=X its compute against this machine's")
    plan.add_argument("--batch", type=positive, default=1, help="rows in flight whose KV caches the boards hold")
    plan.add_argument("--context", type=positive, default=1024, help="positions each row's cache holds")
    plan.set_defaults(func=cmd_cluster_plan)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints its errors: one line, no source file and line of hermes' own code."""
    return f"hermes: warning: {message}\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = one_line_warning
    if argv[:1] == ["export"]:
        return cmd_export(argv[1:])
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except HermesError as e:
        print(f"hermes: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
