"""A stand-in for `bench/offline.py --serve` (tests/bench/test_paired.py): the same protocol, no vLLM.

    python fake_engine.py --serve SPEC.json FD

Answers its header once "started" (`spec["start_s"]` of sleep), then each workload line with a result
that records when it ran (a monotonic clock shared by the processes of one host). `spec["crash_at"]`:
exit with status 3 on that workload (1-based) instead; `spec["hang_at"]`: never answer it.
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[2]).read_text())
    time.sleep(spec.get("start_s", 0.0))
    with open(int(sys.argv[3]), "w") as results:
        header = {"name": spec["name"], "gpu_memory_utilization": spec.get("gpu_memory_utilization")}
        results.write(json.dumps({**header, "started_ns": time.monotonic_ns()}) + "\n")
        results.flush()
        for n, line in enumerate(sys.stdin, start=1):
            if line.strip() == "stop":
                return
            if n == spec.get("crash_at"):
                print(f"{spec['name']}: crashing on workload {n}", flush=True)
                sys.exit(3)
            if n == spec.get("hang_at"):
                time.sleep(3600)
            workload = json.loads(line)
            results.write(json.dumps({"workload": workload, "ran_ns": time.monotonic_ns()}) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
