"""`hermes serve`: plans the batch, starts the engine thread and the server, drains on SIGINT / SIGTERM
(the parser lives in hermes_ort/__main__.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..engine.memory import format_bytes, parse_budget
from ..errors import HermesError


def cmd_serve(args) -> None:
    """Plans for --parallel rows at --context, starts the engine thread, serves until SIGINT/SIGTERM."""
    import os

    try:
        import uvicorn

        from .app import ServerConfig, build_app
        Draining = draining_server()
    except ImportError as e:
        raise HermesError(f"hermes serve needs the serve extra ({e.name} is missing): "
                          f"pip install 'hermes-ort[serve]'") from e
    from ..format import manifest as manifest_io
    from ..generation.decoding import CacheLayout
    from ..generation.tokenizer import Tokenizer
    from ..session import InferenceSession
    from .scheduler import Scheduler

    budget = parse_budget(args.budget, manifest_io.load(args.model_dir).bytes) if args.budget else None
    with InferenceSession(args.model_dir, memory_budget=budget) as session:
        has_tokenizer = (Path(args.model_dir) / "tokenizer.json").is_file()
        tokenizer = Tokenizer.from_dir(args.model_dir) if has_tokenizer else None  # else token-id prompts only
        model_context = CacheLayout.of(session.manifest).max_positions or 1024
        context = args.context or min(model_context, 1024)
        if context > model_context:
            raise HermesError(f"--context {context} exceeds the model's {model_context} positions")
        scheduler = Scheduler(session, tokenizer, max(1, args.parallel), context, max(0, args.max_queue),
                              say=lambda line: print(line, file=sys.stderr), prefill_chunk=args.prefill_chunk)
        scheduler.start()
        root = os.path.abspath(args.model_dir)
        config = ServerConfig(os.path.basename(root.rstrip("/")), root,
                              args.api_key or os.environ.get("HERMES_API_KEY") or None)
        plan = scheduler.plan
        print(f"hermes serve: {config.model} on http://{args.host}:{args.port}/v1 ({scheduler.parallel} rows at "
              f"{context} positions, queue {args.max_queue}; plan: {len(plan.resident)} resident of "
              f"{len(session.manifest.stages)} stages, predicted peak {format_bytes(plan.predicted_peak_bytes)})",
              file=sys.stderr, flush=True)
        server = Draining(uvicorn.Config(build_app(scheduler, config), host=args.host, port=args.port,
                                         log_level="warning", workers=1))
        server.on_drain = scheduler.drain
        try:
            server.run()
        finally:
            scheduler.stop()


def draining_server():
    """uvicorn's Server, stopped by SIGINT / SIGTERM as a drain: no new connections, the open ones finish,
    then a clean exit (uvicorn's own handlers re-raise the signal after shutdown, exiting -15)."""
    import contextlib
    import signal

    import uvicorn

    class Draining(uvicorn.Server):
        on_drain = staticmethod(lambda: None)  # told first: new requests get 503 from then on

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(signum, frame):
                self.should_exit = True
                self.on_drain()

            previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Draining
