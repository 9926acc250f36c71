"""Choosing which stage each node of a graph goes to: pure functions over node lists, no ORT, no disk.

Three ways, in order of preference: repeated blocks named by common exporters (`/h.3/`, `layer.3`),
tensor names the user gives, or cuts along the topological order balanced by weight bytes that cross
the fewest tensors. Stage indices are 0-based and every tensor flows from a lower to a higher stage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SplitError

BLOCK_NAME = re.compile(r"(?:^|[/.])(?:h|layer|layers|block|blocks)[._](\d+)(?=[/._]|$)")


@dataclass(frozen=True)
class Node:
    """What cutting needs of a graph node: its name, tensors in (explicit and implicit) and out, weight bytes."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int = 0


def producers(nodes: list[Node]) -> dict[str, int]:
    return {t: i for i, n in enumerate(nodes) for t in n.outputs}


def by_block_names(nodes: list[Node]) -> list[int] | None:
    """Prelude = 0, block k (in index order) = k + 1, what follows the last block = head; None if the
    names show fewer than two blocks or the blocks do not run in order."""
    found = [BLOCK_NAME.search(n.name) for n in nodes]
    indices = sorted({int(m.group(1)) for m in found if m})
    if len(indices) < 2:
        return None
    rank = {b: k + 1 for k, b in enumerate(indices)}
    last, made = len(indices), producers(nodes)
    stages: list[int] = []
    for node, m in zip(nodes, found):
        upstream = max((stages[made[t]] for t in node.inputs if t in made), default=0)
        if m is None:
            stages.append(last + 1 if upstream == last else upstream)
        elif upstream > rank[int(m.group(1))]:
            return None
        else:
            stages.append(rank[int(m.group(1))])
    return stages


def by_cut_tensors(nodes: list[Node], cuts: list[str]) -> list[int]:
    """Stage k holds what cut tensor k needs and earlier cuts do not; the rest goes to the last stage."""
    made = producers(nodes)
    unknown = [t for t in cuts if t not in made]
    if unknown:
        raise SplitError(f"cut tensors {unknown} are produced by no node of the graph")
    stages, before = [len(cuts)] * len(nodes), [ancestors(nodes, made, t) for t in cuts]
    for k in reversed(range(len(cuts))):
        for i in before[k]:
            stages[i] = k
    for k, tensor in enumerate(cuts):
        if k not in stages:  # everything cut k needs is in an earlier stage already
            earlier = next(cuts[j] for j in range(k) if made[tensor] in before[j])
            raise SplitError(f"cut tensor '{tensor}' adds no stage: it is computed before (or is) '{earlier}', "
                             f"which is cut earlier; give cut tensors in graph order, each once")
    if len(cuts) not in stages:
        raise SplitError(f"nothing is left after cut tensor '{cuts[-1]}': cut before the model's last node")
    return stages


def ancestors(nodes: list[Node], made: dict[str, int], tensor: str) -> set[int]:
    seen, todo = set(), [made[tensor]]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(made[t] for t in nodes[i].inputs if t in made)
    return seen


def crossings(nodes: list[Node]) -> list[int]:
    """crossings[i]: tensors produced before node i and consumed at or after it (a cut before node i)."""
    made, last = producers(nodes), {}
    for i, n in enumerate(nodes):
        for t in n.inputs:
            if t in made:
                last[t] = i
    delta = [0] * (len(nodes) + 1)
    for t, end in last.items():
        delta[made[t] + 1] += 1
        delta[end + 1] -= 1
    out, running = [], 0
    for d in delta[:-1]:
        running += d
        out.append(running)
    return out


def balanced(nodes: list[Node], count: int, slack: float = 0.25) -> list[int]:
    """`count` stages of about equal weight bytes; each cut is the position, within `slack` of a stage's
    bytes from its target, that crosses the fewest tensors."""
    if not 1 <= count <= len(nodes):
        raise SplitError(f"cannot cut {len(nodes)} nodes into {count} stages")
    prefix = [0]
    for n in nodes:
        prefix.append(prefix[-1] + n.weight_bytes)
    total, cross, cuts = prefix[-1] or 1, crossings(nodes), []
    for k in range(1, count):
        target, lo = total * k / count, (cuts[-1] + 1) if cuts else 1
        hi = len(nodes) - (count - k)
        window = [i for i in range(lo, hi + 1) if abs(prefix[i] - target) <= slack * total / count]
        near = min(range(lo, hi + 1), key=lambda i: abs(prefix[i] - target))
        cuts.append(min(window, key=lambda i: (cross[i], abs(prefix[i] - target))) if window else near)
    return [sum(i >= c for c in cuts) for i in range(len(nodes))]
