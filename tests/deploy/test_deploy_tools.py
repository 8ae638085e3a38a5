"""deploy/tools: smoke.py against a stand-in server on 127.0.0.1 (no GPU, no vLLM), and the
command serve_rendered.py builds from a rendered overlay."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from deploy_common import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"vllm_kvcomp_{name}", REPO / "deploy" / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load("smoke")
serve_rendered = _load("serve_rendered")


class FakeVllm:
    """Just enough of `vllm serve` + the plugin's exporter for the smoke script."""

    def __init__(self, compress=True, declare=smoke.KVCOMP_METRICS):
        self.compressed = 0
        self.compress = compress
        self.declare = declare

    def kvcomp_metrics(self) -> str:
        lines = []
        for name in self.declare:
            kind = "histogram" if name.endswith("_seconds") else "counter"
            lines += [f"# HELP {name} x", f"# TYPE {name} {kind}"]
        lines.append(f"vllm_kvcomp_requests_compressed_total {float(self.compressed)}")
        lines.append(f'vllm_kvcomp_tokens_kept_total{{layer="0"}} {20.0 * self.compressed}')
        lines.append(f'vllm_kvcomp_tokens_evicted_total{{layer="0"}} {80.0 * self.compressed}')
        return "\n".join(lines) + "\n"

    def handler(self, role):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, ctype="application/json"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if role == "metrics" and self.path == "/metrics":
                    return self.reply(200, fake.kvcomp_metrics(), "text/plain")
                if role == "api" and self.path == "/health":
                    return self.reply(200, "")
                if role == "api" and self.path == "/v1/models":
                    return self.reply(200, json.dumps({"data": [{"id": "tiny"}]}))
                if role == "api" and self.path == "/metrics":
                    return self.reply(200, "vllm:num_requests_running 0\n", "text/plain")
                return self.reply(404, "{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/completions":
                    if fake.compress:
                        fake.compressed += 1
                    return self.reply(
                        200,
                        json.dumps(
                            {"choices": [{"text": " 93"}], "usage": {"prompt_tokens": len(body["prompt"]) // 4}}
                        ),
                    )
                if self.path == "/v1/chat/completions":
                    return self.reply(200, json.dumps({"choices": [{"message": {"content": "hello"}}]}))
                return self.reply(404, "{}")

        return Handler


@pytest.fixture
def serve():
    servers = []

    def start(fake):
        urls = []
        for role in ("api", "metrics"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler(role))
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            servers.append(server)
            urls.append(f"http://127.0.0.1:{server.server_address[1]}")
        return urls

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_smoke_passes_against_a_compressing_server(serve):
    api, metrics = serve(FakeVllm())
    lines = []
    smoke.run(api, metrics, None, chat=True, compression=True, log=lines.append)
    assert lines[-1].startswith("ok   compression ran: requests 0 -> 1, kept fraction so far 0.200")


def test_smoke_fails_when_nothing_is_compressed(serve):
    api, metrics = serve(FakeVllm(compress=False))
    with pytest.raises(smoke.SmokeError, match="compression did not run"):
        smoke.run(api, metrics, None, chat=True, compression=True, log=lambda _: None)
    smoke.run(api, metrics, None, chat=True, compression=False, log=lambda _: None)


def test_smoke_fails_on_a_missing_metric_or_model(serve):
    api, metrics = serve(FakeVllm(declare=smoke.KVCOMP_METRICS[:-1]))
    with pytest.raises(smoke.SmokeError, match="vllm_kvcomp_eviction_seconds"):
        smoke.run(api, metrics, None, chat=False, compression=False, log=lambda _: None)
    with pytest.raises(smoke.SmokeError, match="not other"):
        smoke.run(api, metrics, "other", chat=False, compression=False, log=lambda _: None)


def test_smoke_reports_an_unreachable_server():
    assert smoke.main(["--api", "http://127.0.0.1:9", "--metrics", "http://127.0.0.1:9"]) == 1


def test_metric_names_match_the_plugins_exporter():
    """The names the smoke test, the PromQL in docs/DEPLOY.md and the dashboards use are the
    ones the plugin's exporter declares."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    from vllm_kvcomp.config import CompressionConfig
    from vllm_kvcomp.engine.metrics import CompressionMetrics

    registry = CollectorRegistry()
    CompressionMetrics(CompressionConfig(method="zigzag", metrics_port=None), registry=registry)
    text = generate_latest(registry).decode()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert set(smoke.KVCOMP_METRICS) <= declared
    guide = (REPO / "docs" / "DEPLOY.md").read_text()
    used = set(re.findall(r"\bvllm_kvcomp_[a-z_]+", guide))
    series = declared | {f"{name}_{suffix}" for name in declared for suffix in ("bucket", "sum", "count")}
    assert used <= series, f"docs/DEPLOY.md uses metrics the plugin does not export: {used - series}"


@pytest.mark.parametrize("target", ["overlays/single-gpu", "overlays/tp2"])
def test_serve_rendered_runs_the_containers_command(rendered, target, tmp_path):
    """serve_rendered.py (how the overlay was run on an H100) starts exactly the container's
    `vllm serve` arguments, with only the model and config directories made local."""
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered[target]))
    pod, files = serve_rendered.load_rendered(path)
    argv, env = serve_rendered.build_command(pod, tmp_path / "model", tmp_path / "etc", tmp_path / "home")
    container = next(d for d in rendered[target] if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert argv[:3] == ["vllm", "serve", str(tmp_path / "model")]
    assert len(argv) == 2 + len(container["args"])
    config = argv[argv.index("--kv-compression-config") + 1]
    assert config == str(tmp_path / "etc" / "uniform.yaml") and "uniform.yaml" in files
    assert argv[argv.index("--tensor-parallel-size") + 1] == env["TENSOR_PARALLEL_SIZE"]
    assert "$(" not in " ".join(argv)
