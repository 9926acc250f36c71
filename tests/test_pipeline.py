"""The PipeLoad engine: exact outputs, a window that holds, resident stages, and clean failure."""
import json
import threading

import numpy as np
import pytest

import hermes_ort
from hermes_ort.engine.merged import MergedStages
from hermes_ort.engine import loading
from hermes_ort.errors import StageError
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.pipeline import stage_config
from hermes_ort.planning.planner import Plan
from hermes_ort.engine.trace import Tracer


def pipeline_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("loader-", "daemon"))]


def make_plan(manifest, loaders=1, window=1, resident=(), prepacked=()):
    return Plan(budget=0, loaders=loaders, window=window, resident=tuple(resident), prepacked=tuple(prepacked),
                compute_threads=1, predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)


@pytest.fixture
def gpt2(exported):
    return exported("tiny-gpt2").directory


def run(directory, plan=None, tracer=None, **options):
    with hermes_ort.InferenceSession(directory, plan_override=plan, tracer=tracer, **options) as session:
        feed = synthetic_feed(session.manifest, {"sequence": 12})
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@pytest.mark.parametrize("loaders, window, resident, prepacked", [
    (1, 1, (), ()), (2, 3, (), ()), (2, 2, ("embeddings", "head_02"), ("block_00",)), (1, 6, "all", "all"),
])
def test_every_plan_gives_the_sequential_outputs(gpt2, loaders, window, resident, prepacked):
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    names = [s.name for s in manifest.stages]
    plan = make_plan(manifest, loaders, window, names if resident == "all" else resident,
                     names if prepacked == "all" else prepacked)
    reference = run(gpt2, make_plan(manifest))
    got = run(gpt2, plan)
    assert all(np.max(np.abs(got[k] - reference[k])) <= 1e-5 for k in reference)
    assert pipeline_threads() == []


@pytest.mark.parametrize("window", [1, 2, 3])
def test_window_bounds_the_loaded_stages(gpt2, window):
    tracer = Tracer()
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    run(gpt2, make_plan(manifest, loaders=2, window=window), tracer)
    loaded = {s.name.split()[1]: s.start_s for s in tracer.spans if s.category == "load"}
    freed = {s.name.split()[1]: s.end_s for s in tracer.spans if s.category == "destroy"}
    assert set(loaded) == set(freed) == {s.name for s in manifest.stages}
    alive_at = lambda t: sum(loaded[n] <= t < freed[n] for n in loaded)
    assert max(alive_at(t) for t in loaded.values()) <= window


@pytest.mark.parametrize("window", [2, 3])
def test_loading_overlaps_compute_and_fills_the_window(gpt2, monkeypatch, window):
    """Stage i may run only once the next window - 1 stages have loaded, so a pipeline that never loads
    ahead times out; the stages alive at once then reach the window."""
    real, cond, loaded, alive, most = loading.prepare, threading.Condition(), [], set(), [0]
    names = [s.name for s in hermes_ort.InferenceSession(gpt2).manifest.stages]

    class WaitsForTheNextStages:
        def __init__(self, name, prepared):
            self.name, self.prepared = name, prepared

        def run(self, tensors):
            ahead = names[names.index(self.name) + 1:names.index(self.name) + window]
            with cond:
                assert cond.wait_for(lambda: set(ahead) <= set(loaded), timeout=10), (
                    f"{self.name} ran while {ahead} were not loaded: loading does not overlap compute")
            return self.prepared.run(tensors)

        def close(self):
            with cond:
                alive.discard(self.name)
            self.prepared.close()

    def prepare(directory, stage, *rest):
        prepared = WaitsForTheNextStages(stage.name, real(directory, stage, *rest))
        with cond:
            loaded.append(stage.name)
            alive.add(stage.name)
            most[0] = max(most[0], len(alive))
            cond.notify_all()
        return prepared

    monkeypatch.setattr(loading, "prepare", prepare)
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    run(gpt2, make_plan(manifest, loaders=2, window=window))
    assert most[0] == window and sorted(loaded) == sorted(names)  # two loaders may finish out of order


def test_embedding_tables_are_looked_up_not_read_ahead(gpt2, monkeypatch):
    """Reading ahead wte would cost its whole size for the few rows a run looks up; a head part reads the
    rows of wte it multiplies by."""
    reads = []
    monkeypatch.setattr(loading, "read_ahead", lambda path, start=0, length=None, huge=True: reads.append(
        (path.name, length)))
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    head = next(s for s in manifest.stages if s.kind == "head")
    with hermes_ort.InferenceSession(gpt2, plan_override=make_plan(manifest, 1, 2)) as session:
        templates = session._resident.templates
        for stage in (manifest.stage("embeddings"), head):
            loading.prepare(gpt2, stage, stage_config(session.plan, stage), templates).close()
            reads.append(stage.name)
    assert reads[0] == "embeddings"  # nothing read ahead for it
    assert reads[1:] and all(r[0] == "embeddings.data" and r[1] > 0 for r in reads[1:-1]) and reads[-1] == head.name


def test_lookups_give_back_the_pages_they_mapped(tmp_path):
    """A resident embeddings stage must not grow toward its whole table as a generation meets new tokens."""
    from hermes_ort.engine.prepared import MappedWeights
    from hermes_ort.engine.templates import WeightRef

    rows, width = 16384, 1024  # a 64 MiB float32 table
    (tmp_path / "table.data").write_bytes(np.ones((rows, width), np.float32).tobytes())
    table = WeightRef("w_0", "table.data", 0, rows * width * 4, "float32", (rows, width), looked_up=True)
    file_rss = lambda: next(int(line.split()[1]) << 10 for line in open("/proc/self/status")
                            if line.startswith("RssFile"))
    weights = MappedWeights(tmp_path, (table,))
    before = file_rss()
    looked_up = weights.arrays["w_0"][np.arange(0, rows, 64)].sum()  # 256 rows spread over the table
    grown = file_rss() - before
    weights.release_lookups()
    released = file_rss() - before
    weights.close()
    assert looked_up == 256 * width and grown >= 256 * width * 4  # at least the rows' pages were mapped
    assert released <= grown / 4


def test_every_embeddings_run_releases_its_lookups(gpt2, monkeypatch):
    from hermes_ort.engine.prepared import MappedWeights

    released, real = [], MappedWeights.release_lookups
    monkeypatch.setattr(MappedWeights, "release_lookups", lambda self: released.append(len(self.lookups)) or real(self))
    with hermes_ort.InferenceSession(gpt2, memory_budget="4GiB") as session:  # embeddings resident
        feed = synthetic_feed(session.manifest, {"sequence": 4})
        for _ in range(3):
            session.run(None, feed)
    assert released.count(1) == 3  # one mapping of lookup tables (embeddings.data), released after each run


def test_resident_stages_are_not_reloaded(gpt2, monkeypatch):
    loads = []
    real = loading.prepare
    monkeypatch.setattr(loading, "prepare", lambda d, stage, *rest: loads.append(stage.name) or real(d, stage, *rest))
    with hermes_ort.InferenceSession(gpt2, memory_budget="4GiB") as session:
        feed = synthetic_feed(session.manifest, {"sequence": 4})
        first = session.run(None, feed)
        count = len(loads)
        second = session.run(None, feed)
        merged = {i for i, p in session._resident.stages.items() if isinstance(p, MergedStages)}
    assert merged and count + len(merged) == len(session.manifest.stages)  # every stage prepared once, or merged
    assert len(loads) == count and len(set(loads)) == count  # nothing loaded the second time
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_small_budget_streams_every_run(gpt2, monkeypatch):
    loads = []
    real = loading.prepare
    monkeypatch.setattr(loading, "prepare", lambda d, stage, *rest: loads.append(stage.name) or real(d, stage, *rest))
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    with hermes_ort.InferenceSession(gpt2, plan_override=make_plan(manifest, 1, 2)) as session:
        feed = synthetic_feed(manifest, {"sequence": 4})
        session.run(None, feed)
        session.run(None, feed)
    assert len(loads) == 2 * len(manifest.stages)


@pytest.fixture
def failing_loader(monkeypatch):
    """Makes loading the named stage raise the given exception, as a disk or ORT failure would."""

    def install(stage_name, error):
        real = loading.prepare

        def prepare(directory, stage, *rest):
            if stage.name == stage_name:
                raise error
            return real(directory, stage, *rest)

        monkeypatch.setattr(loading, "prepare", prepare)

    return install


@pytest.mark.parametrize("loaders, window", [(1, 1), (2, 4)])
def test_loader_failure_reaches_the_caller_and_leaves_nothing_running(gpt2, failing_loader, loaders, window):
    failing_loader("block_01", OSError("Input/output error"))
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    with pytest.raises(StageError, match="stage 'block_01' \\(block_01.onnx\\): loading failed: OSError"):
        run(gpt2, make_plan(manifest, loaders, window))
    assert pipeline_threads() == []


def test_corrupt_stage_bytes_name_the_stage_and_file(gpt2, tmp_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(gpt2, target)
    path = target / "block_01.onnx"
    path.write_bytes(b"\x00" * path.stat().st_size)
    with pytest.raises(StageError, match="stage 'block_01' \\(block_01.onnx\\): cannot load .*block_01.onnx"):
        run(target, make_plan(hermes_ort.InferenceSession(target).manifest, 2, 3))
    assert pipeline_threads() == []


def test_interrupt_during_a_run_leaves_nothing_running(gpt2, monkeypatch):
    real = loading.prepare
    closed = []

    class Interrupted:
        def __init__(self, prepared):
            self.prepared = prepared

        def run(self, tensors):
            raise KeyboardInterrupt

        def close(self):
            closed.append(True)
            self.prepared.close()

    def prepare(directory, stage, *rest):
        prepared = real(directory, stage, *rest)
        return Interrupted(prepared) if stage.name == "block_01" else prepared

    monkeypatch.setattr(loading, "prepare", prepare)
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    with pytest.raises(KeyboardInterrupt):
        run(gpt2, make_plan(manifest, 2, 4))
    assert pipeline_threads() == [] and closed == [True]


def test_trace_has_a_row_per_thread_and_a_span_per_load_run_destroy(gpt2, tmp_path):
    tracer = Tracer()
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    run(gpt2, make_plan(manifest, 2, 2), tracer)
    tracer.save(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    threads = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"inference", "daemon"} <= threads and threads & {"loader-0", "loader-1"}
    spans = [e for e in events if e["ph"] == "X"]
    for category in ("load", "run", "destroy"):
        assert len([e for e in spans if e["cat"] == category]) == len(manifest.stages)


def test_blocks_share_one_template_session(gpt2):
    from hermes_ort.engine.prepared import TemplateStage
    from hermes_ort.engine.templates import Templates

    manifest = hermes_ort.InferenceSession(gpt2).manifest
    templates = Templates(gpt2, manifest)
    assert {"block_00", "block_01"} <= set(templates.forms)
    assert templates.forms["block_00"].key == templates.forms["block_01"].key
    assert templates.forms["embeddings"].looks_up_only  # its own graph, fed its tables to release lookups
    assert not any(s.kind == "head" for s in manifest.stages if s.name in templates.forms)  # Gemm(transB)
    config = make_plan(manifest)
    from hermes_ort.engine.pipeline import stage_config

    prepared = [loading.prepare(gpt2, manifest.stage(n), stage_config(config, manifest.stage(n)), templates)
                for n in ("block_00", "block_01")]
    assert all(isinstance(p, TemplateStage) for p in prepared) and len(templates.sessions) == 1
    for p in prepared:
        p.close()


def test_failure_while_closing_a_stage_reaches_the_caller(gpt2, monkeypatch):
    real = loading.prepare

    class BrokenClose:
        def __init__(self, prepared):
            self.prepared = prepared

        def run(self, tensors):
            return self.prepared.run(tensors)

        def close(self):
            self.prepared.close()
            raise BufferError("cannot close exported pointers exist")

    monkeypatch.setattr(loading, "prepare", lambda d, stage, *rest: BrokenClose(real(d, stage, *rest))
                        if stage.name == "block_00" else real(d, stage, *rest))
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    for loaders, window in [(1, 1), (2, 6)]:  # with a wide window every later stage may be ready already
        with pytest.raises(StageError, match="stage 'block_00' .*closing failed"):
            run(gpt2, make_plan(manifest, loaders, window))
        assert pipeline_threads() == []


def test_embedding_tables_are_not_read_ahead(gpt2):
    from hermes_ort.engine.templates import Templates

    templates = Templates(gpt2, hermes_ort.InferenceSession(gpt2).manifest)
    embeddings = {w.shape: w.looked_up for w in templates.canonical["embeddings"].weights}
    assert embeddings == {(2048, 64): True, (128, 64): True}  # wte and wpe: a run reads a few rows
    assert not any(w.looked_up for w in templates.canonical["head_00"].weights)  # the head reads all of its rows


def test_file_missing_at_run_time_names_stage_and_file(gpt2, tmp_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(gpt2, target)
    session = hermes_ort.InferenceSession(target, plan_override=make_plan(
        hermes_ort.InferenceSession(target).manifest, 2, 3))
    feed = synthetic_feed(session.manifest, {"sequence": 4})
    expected = session.run(None, feed)
    data = (target / "block_01.data").read_bytes()
    (target / "block_01.data").unlink()  # while the session is open: a disk or a user removed it
    with pytest.raises(StageError, match="stage 'block_01' .*block_01.data"):
        session.run(None, feed)
    assert pipeline_threads() == []
    (target / "block_01.data").write_bytes(data)  # put back: the same session runs again
    for got, want in zip(session.run(None, feed), expected):
        np.testing.assert_array_equal(got, want)
    session.close()
