"""bench.gc_debug: vLLM's GC debug lines summed per generation."""

from bench.gc_debug import summarize

PREFIX = "INFO 12-02 14:00:01 [gc_utils.py:80] "
LOG = "\n".join(
    [
        PREFIX + "GC took 0.250ms to complete. Collected 3 objects (out of 700) in GC generation 0.",
        "(EngineCore pid=12) "
        + PREFIX
        + "GC took 1.500ms to complete. Collected 40 objects (out of 9000) in GC generation 2.",
        "INFO 12-02 14:00:02 [other.py:1] something else took 3.0ms",
        PREFIX + "GC took 0.750ms to complete. Collected ? objects (out of 650) in GC generation 0.",
    ]
)


def test_pauses_are_summed_per_generation():
    report = summarize(LOG)
    assert report["generations"]["0"] == {"collections": 2, "total_ms": 1.0, "max_ms": 0.75, "max_objects": 700}
    assert report["generations"]["2"]["collections"] == 1 and report["generations"]["2"]["max_objects"] == 9000
    assert report["total_ms"] == 2.5 and "1" not in report["generations"]
    assert report["at_shutdown"] == {"total_ms": 0.0, "generations": {}}


def test_collections_after_the_shutdown_signal_are_summed_apart():
    teardown = "\n".join(
        [
            "(EngineCore pid=12) INFO 12-02 14:00:09 [core.py:1214] [shutdown] EngineCore: trigger received",
            "(EngineCore pid=12) "
            + PREFIX
            + "GC took 712.000ms to complete. Collected 41 objects (out of 965576) in GC generation 2.",
        ]
    )
    report = summarize(LOG + "\n" + teardown)
    assert report["total_ms"] == 2.5 and report["generations"]["2"]["collections"] == 1
    assert report["at_shutdown"]["total_ms"] == 712.0
    assert report["at_shutdown"]["generations"]["2"]["max_objects"] == 965576


def test_a_log_without_the_debugger_has_nothing():
    empty = {"total_ms": 0.0, "generations": {}}
    assert summarize("INFO nothing here\n") == {**empty, "at_shutdown": empty}
