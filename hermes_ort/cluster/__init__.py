"""Stage ranges on several boards (the `ray` extra): ranges.py the sub-manifest of a range, placement.py which
board runs which range (pure), pipeline.py the Ray actors that run them. Ray is imported only when a
Pipeline is opened, so `import hermes_ort.cluster` works without it."""
from .placement import Assignment, Board, Placement, StageLoad, place
from .pipeline import Pipeline
from .ranges import RangeFlow, StageRange, flow, range_manifest, write_range
from .ray_api import BoardError

__all__ = ["Pipeline", "BoardError", "StageRange", "RangeFlow", "flow", "range_manifest", "write_range", "Board",
           "StageLoad", "Assignment", "Placement", "place"]
