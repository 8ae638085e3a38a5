"""bench.offline's provenance: what every results file records."""

from __future__ import annotations

import datetime

from bench.offline import provenance


def test_provenance_names_the_command_commit_date_device_and_versions(monkeypatch):
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    run = {"device": "NVIDIA H200", "vllm": "0.25.1", "torch": "2.11.0", "output_tokens": 5}
    record = provenance("pytest -m gpu x", run)
    assert {k: record[k] for k in ("command", "commit", "device", "vllm", "torch")} == {
        "command": "pytest -m gpu x",
        "commit": "feed123",
        "device": "NVIDIA H200",
        "vllm": "0.25.1",
        "torch": "2.11.0",
    }
    assert "output_tokens" not in record
    assert datetime.datetime.fromisoformat(record["date"]).tzinfo is not None
