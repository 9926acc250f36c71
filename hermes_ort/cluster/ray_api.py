"""The only door to Ray: import it on first use (so hermes works without the extra), and turn whatever a
remote call raises or never returns into one HermesError naming the board, within the caller's timeout."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import HermesError

INSTALL = 'pip install "hermes-ort[ray]"'


class BoardError(HermesError):
    """A board is lost (its node or actor died) or did not answer in time; the message names it."""


def need_ray():
    """The ray module, or a HermesError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise HermesError(f"hermes_ort.cluster needs Ray, which is not installed: {INSTALL}") from None
    if not ray.is_initialized():
        raise HermesError("hermes_ort.cluster.Pipeline runs on a connected Ray cluster: call "
                          "ray.init(address=...) first")
    return ray


def get(ref, board: str, what: str, timeout_s: float) -> Any:
    """ray.get(ref) within timeout_s; a lost board or a late answer is a BoardError naming `board`, an error
    the board's hermes raised comes back as its own type with the board named."""
    import ray
    from ray import exceptions as rx

    try:
        return ray.get(ref, timeout=timeout_s)
    except rx.GetTimeoutError:
        raise BoardError(f"board '{board}' did not answer {what} within {timeout_s:g} s") from None
    except rx.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, HermesError):
            raise type(cause)(f"board '{board}': {cause}") from cause
        if isinstance(cause, rx.RayError):  # an upstream board's loss, carried through this call's arguments
            raise lost(board, what, cause) from cause
        raise BoardError(f"board '{board}' failed {what}: {type(cause or e).__name__}: {cause or e}") from e
    except rx.RayError as e:  # actor died, node died, object lost, worker crashed, unschedulable
        raise lost(board, what, e) from e


def lost(board: str, what: str, e: BaseException) -> BoardError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return BoardError(f"board '{board}' is lost during {what} ({type(e).__name__}: {first})")


def culprit(refs: Sequence[tuple[str, Any]], what: str, timeout_s: float) -> None:
    """Raises for the first (board, ref) of a chain whose answer is missing or failed; returns if none is.
    Runs on the error path only (a good answer it looks at is fetched)."""
    import ray

    for board, ref in refs:
        ready, _ = ray.wait([ref], timeout=0, fetch_local=False)
        if not ready:
            raise BoardError(f"board '{board}' did not answer {what} within {timeout_s:g} s")
        get(ref, board, what, timeout_s)


def chained_get(refs: Sequence[tuple[str, Any]], what: str, timeout_s: float) -> Any:
    """The last ref's value of a chain of calls (each board's call takes earlier boards' refs). When it fails
    or times out, the error names the first board whose answer is missing, not the last in line."""
    board, last = refs[-1]
    try:
        return get(last, board, what, timeout_s)
    except HermesError:
        culprit(refs[:-1], what, timeout_s)
        raise
