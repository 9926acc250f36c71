"""run_chain keeps each tensor until its last reader has run, and no longer."""
import numpy as np

from hermes_ort.engine.chain import run_chain
from hermes_ort.format.manifest import FileSpec, Manifest, StageSpec, TensorSpec


def tensor(name):
    return TensorSpec(name, "float32", (1,))


def stage(name, inputs, outputs):
    return StageSpec(name, "graph", FileSpec(f"{name}.onnx", 0, ""), (), tuple(map(tensor, inputs)),
                     tuple(map(tensor, outputs)))


# x feeds a and c; a's "spare" output is read by nobody; b's "y" is read by c; the model gives c's "out" and b's "y"
MODEL = Manifest("test", {}, (tensor("x"), tensor("unused")), (tensor("out"), tensor("y")), (
    stage("a", ["x"], ["h", "spare"]), stage("b", ["h"], ["y"]), stage("c", ["x", "y"], ["out"])))


class Recorder:
    """Stage runner that records which tensors were alive when each stage ran."""

    def __init__(self, tensors_seen):
        self.seen = tensors_seen

    def prepared_for(self, i):
        spec = MODEL.stages[i]
        seen = self.seen

        class Run:
            def run(self, tensors, into=None):
                seen.append(sorted(tensors))
                return {t.name: np.float32(i) for t in spec.outputs}

            def close(self):
                pass
        return Run()


def test_a_decoding_pass_holds_only_the_tensors_still_to_be_read():
    seen = []
    feed = {"x": np.float32(1), "unused": np.float32(2)}
    out = run_chain(MODEL, feed, Recorder(seen).prepared_for, decoding=True)
    assert seen == [["unused", "x"], ["h", "x"], ["x", "y"]]
    assert sorted(out) == ["out", "y"] and sorted(feed) == ["out", "y"]  # the chain owned the feed
