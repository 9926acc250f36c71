"""The `hermes generate`, `convert`, `quantize`, `cache` and `warm` commands: plain functions over parsed arguments
(the parser itself lives in __main__.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import HermesError
from .format.manifest import weights_note
from .engine.memory import available, format_bytes, parse_budget, peak_rss


def sampling_args(args) -> dict:
    """The sampling flags given; any of temperature, top-k, top-p or seed asks for sampling."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    options = {k: v for k, v in given.items() if v is not None}
    if args.do_sample or options.keys() - {"repetition_penalty"}:
        options["do_sample"] = True
    return options


def speculation_args(args) -> dict:
    """--speculate and --draft-tokens as stream()'s options, with the stats the closing line reports."""
    if args.speculate is None:
        return {}
    from .generation.speculative import SpeculationStats

    return {"speculate": args.speculate, "draft_tokens": args.draft_tokens, "speculation_stats": SpeculationStats()}


def prompts_of(args) -> list[str]:
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as e:
            raise HermesError(f"cannot read --prompts-file: {e}") from None
        return [line for line in lines if line.strip()] or [""]
    return [args.prompt]


def cmd_generate(args) -> None:
    from .format import manifest as manifest_io

    budget = parse_budget(args.budget, manifest_io.load(args.model_dir).bytes) if args.budget else None
    start = time.perf_counter()
    if args.ids is None and args.prompt is None and args.prompts_file is None:
        raise HermesError("give --prompt TEXT, --prompts-file FILE or --ids 1,2,3")
    speculation = speculation_args(args)
    count, first, session = (generate_ids if args.ids is not None else generate_text)(args, budget, start,
                                                                                    speculation)
    seconds = time.perf_counter() - start
    plan = session.last_generation_plan or session.plan
    rate = (count - 1) / max(seconds - first, 1e-9) if count > 1 else 0.0
    streamed = len(session.manifest.stages) - len(plan.resident)
    print(f"\n{count} tokens from {args.model_dir}{weights_note(session.manifest)}; first token {first:.2f} s, "
          f"then {rate:.2f} tokens/s; peak RSS "
          f"{format_bytes(peak_rss())} (budget {format_bytes(session.budget)}; plan: {len(plan.resident)} "
          f"resident, {streamed} streamed stages, {plan.loaders} loaders, window {plan.window})", file=sys.stderr)
    if speculation:
        print(f"speculation ({args.speculate}): {speculation['speculation_stats'].describe()}", file=sys.stderr)


def generate_ids(args, budget, start, speculation: dict):
    import numpy as np

    from .generation_api import stream
    from .session import InferenceSession

    try:
        prompt = np.array([[int(t) for t in args.ids.split(",")]], np.int64)
    except ValueError:
        raise HermesError(f"--ids must be comma-separated token ids, got {args.ids!r}") from None
    with InferenceSession(args.model_dir, memory_budget=budget) as session:
        tokens, first = [], 0.0
        for step in stream(session, prompt, args.max_new_tokens, eos_token_id=args.eos, **sampling_args(args),
                           **speculation):
            first = first or time.perf_counter() - start
            tokens.append(int(step[0]))
        print(",".join(map(str, tokens)))
    return len(tokens), first, session


def generate_text(args, budget, start, speculation: dict):
    from .text_generator import TextGenerator

    options = dict(max_new_tokens=args.max_new_tokens, chat=args.chat, stop=args.stop or (), **sampling_args(args),
                   **speculation)
    prompts = prompts_of(args)
    with TextGenerator(args.model_dir, memory_budget=budget) as gen:
        if len(prompts) == 1:
            for piece in gen.stream(prompts[0], **options):
                print(piece, end="", flush=True)
            print()
        else:
            for k, text in enumerate(gen(prompts, **options)):
                print(f"--- prompt {k}: {prompts[k]}\n{text}")
    first = (gen.first_token_at or time.perf_counter()) - start
    return gen.steps * len(prompts), first, gen.session


def cmd_convert(args) -> None:
    from .convert import convert_gguf

    shown = []

    def show(done: int, total: int) -> None:
        shown.append(done)
        print(f"\rconverting: block {done}/{total}", end="", file=sys.stderr, flush=True)

    try:
        result = convert_gguf(args.gguf, args.out, args.precision, args.accuracy_level, progress=show)
    finally:
        if shown:
            print(file=sys.stderr)  # ends the progress line, so an error is a line of its own
    m = result.manifest
    level = f", accuracy level {m.extra['accuracy_level']}" if "accuracy_level" in m.extra else ""
    print(f"converted {args.gguf} ({m.family}, {m.config['num_hidden_layers']} layers, {args.precision}{level}): "
          f"{len(m.stages)} stages, {format_bytes(m.bytes)} -> {args.out} in {result.seconds:.1f} s; self-check "
          f"max relative diff {result.max_diff:.2g} (tolerance {m.extra['tolerance']})")
    for note in result.notes:
        print(f"note: {note}")


def cmd_quantize(args) -> None:
    from .convert.quantize import QuantizeSettings, quantize_dir

    settings = QuantizeSettings(args.bits, args.block_size, args.accuracy_level, args.head_bits, args.scheme)
    start = time.perf_counter()
    m = quantize_dir(args.model_dir, args.out, settings)
    print(f"quantized {args.model_dir} to int{args.bits} (head int{args.head_bits}, block {args.block_size}, "
          f"{args.scheme} codes, accuracy level {args.accuracy_level}): {format_bytes(m.bytes)} -> {args.out} in "
          f"{time.perf_counter() - start:.1f} s")
    for output, figures in m.extra["drift"].items():
        print(f"  drift of '{output}': " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))


def cmd_cache(args) -> None:
    from . import model_cache

    if args.action == "clear":
        freed, kept = model_cache.clear()
        busy = f"; kept {kept} entries that open sessions still read" if kept else ""
        print(f"freed {format_bytes(freed)} from {model_cache.cache_root()}{busy}")
        return
    found = model_cache.entries()
    print(f"{model_cache.cache_root()}: {len(found)} models split from .onnx files")
    for e in found:
        print(f"  {e.key}  {format_bytes(e.bytes):>11}  {e.source}")


def cmd_batched(args) -> None:
    from .engine.templates import Templates
    from .format import manifest as manifest_io
    from .engine.batched_writer import write_layout
    from .format.batched_layout import LAYOUT_DIR, remove_layout

    directory = Path(args.model_dir)
    manifest = manifest_io.load(directory)
    if args.remove:
        print(f"{directory / LAYOUT_DIR}: {'removed' if remove_layout(directory) else 'there was none'}")
        return
    start = time.perf_counter()
    layout = write_layout(directory, manifest, Templates(directory, manifest))
    if not layout.stages:
        remove_layout(directory)
        print(f"{args.model_dir}: no streamed stage has a matrix to transpose: nothing written")
        return
    matrices = sum(p.transposed for placed in layout.stages.values() for p in placed)
    print(f"{directory / LAYOUT_DIR}: {matrices} matrices of {len(layout.stages)} "
          f"stages transposed ({format_bytes(sum(f.bytes for f in layout.files))}) in "
          f"{time.perf_counter() - start:.1f} s; generations read them")


def cmd_warm(args) -> None:
    from .format import manifest as manifest_io
    from .format.warm import warm

    start = time.perf_counter()
    directory = Path(args.model_dir)
    manifest = manifest_io.load(directory)
    packed = saved_packs(directory, manifest)
    paths = warm(directory, manifest)
    print(f"{args.model_dir}: {len(paths)} weight files ({format_bytes(sum(p.stat().st_size for p in paths))}) "
          f"read into the page cache in {time.perf_counter() - start:.1f} s, in huge pages but for lookup "
          f"tables: streamed stages map in a fraction of a millisecond" + (
              f"; {len(packed)} quantized stages' packs saved or found intact under {packed[0].directory.parent}"
              if packed else ""))


def saved_packs(directory: Path, manifest) -> list:
    """Every quantized stage's saved pack (engine/packs.py), built where missing or stale, and read into the
    page cache: the first generation then opens each stage once, without packing it."""
    from .engine import packs
    from .engine.loading import quick_to_create
    from .engine.sessions import SessionConfig
    from .engine.templates import Templates
    from .format import page_cache

    if not packs.enabled():
        return []
    templates, files, found = Templates(directory, manifest), packs.PackFiles(), []
    for stage in manifest.stages:
        if templates.canonical[stage.name].quantized:
            templates.integrity.stage(stage)
            found.append(files.pack(directory, stage, quick_to_create(SessionConfig(), stage, templates)))
            page_cache.recache(found[-1].data)
    templates.close()
    return found


def print_generation_plan(args, manifest) -> None:
    from .generation.decode_plan import Workload, decode_profile, has_transposed_layout, measured_batches, plan_generation
    from .generation.decoding import CacheLayout
    from .planning.profiles import DECODE_PROFILE_NAME
    from .planning.report import plan_text
    from .session import HEADROOM
    from .engine.templates import Templates

    directory = Path(args.model_dir)
    if not measured_batches(directory):
        print(f"hermes: no {DECODE_PROFILE_NAME}: step times estimated from weight sizes; "
              f"`hermes profile {directory} --decode` measures them", file=sys.stderr)
    layout = CacheLayout.of(manifest)
    work = Workload(args.batch, args.prompt, args.max_length or args.prompt + 256)
    budget = parse_budget(args.budget, manifest.bytes) if args.budget else int(available() * HEADROOM)
    templates = Templates(directory, manifest)
    p = plan_generation(decode_profile(directory, manifest, templates, work.batch), layout, manifest, work, budget,
                        args.cold, has_transposed_layout(templates))
    print(f"generation: batch {work.batch}, prompt {work.prompt}, up to {work.max_length} positions; KV cache at "
          f"that length {format_bytes(layout.bytes(work.batch, work.max_length))} (inside the budget)")
    print(plan_text(p))
    print(f"predicted: {work.batch / p.predicted_steady_s:.1f} tokens/s (all rows) after the first step, "
          f"peak {format_bytes(p.predicted_peak_bytes)}")
