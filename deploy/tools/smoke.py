#!/usr/bin/env python3
"""Smoke-test a running vllm-kvcomp server: API, health, both metrics endpoints, compression.

Standard library only, so it also runs inside the image:

    kubectl -n NS port-forward deploy/vllm-kvcomp 8000 9464 &
    python3 deploy/tools/smoke.py                          # http://127.0.0.1:8000 and :9464
    kubectl -n NS exec -i deploy/vllm-kvcomp -- python3 - < deploy/tools/smoke.py

Checks, in order (exit 1 at the first failure, with the reason):
  GET  /health on the API port                  -> 200
  GET  /v1/models                               -> the served model (or --model) is listed
  POST /v1/completions with a long prompt       -> 200 and text
  POST /v1/chat/completions                     -> 200 and a message (skip with --no-chat)
  GET  /metrics on the API port                 -> vLLM's vllm:* metrics
  GET  /metrics on the plugin's port            -> every vllm_kvcomp_* metric is declared, and
       vllm_kvcomp_requests_compressed_total grew after the long prompt (skip with --no-compression)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request

KVCOMP_METRICS = (
    "vllm_kvcomp_requests_compressed_total",
    "vllm_kvcomp_tokens_kept_total",
    "vllm_kvcomp_tokens_evicted_total",
    "vllm_kvcomp_blocks_freed_total",
    "vllm_kvcomp_eviction_seconds",
)
# Long enough that any budget below 1.0 evicts something: the plugin always keeps
# num_sinks + num_recent (68 tokens by default) and compresses only above that.
LONG_PROMPT = (
    " ".join(f"Item {i}: the value of key-{i} is {i * 7 % 101}." for i in range(120))
    + " Question: what is the value of key-42? Answer:"
)


class SmokeError(Exception):
    pass


def request(url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as err:
        raise SmokeError(f"{url}: cannot connect ({err})") from None


def expect_ok(url: str, body: dict | None = None) -> str:
    status, text = request(url, body)
    if status != 200:
        raise SmokeError(f"{url}: HTTP {status}: {text[:300]}")
    return text


def counter_total(metrics_text: str, name: str) -> float:
    """Sum of all samples of `name` (any labels)."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$", line)
        if match:
            total += float(match.group(2))
    return total


def run(api: str, metrics: str, model: str | None, chat: bool, compression: bool, log=print) -> None:
    api, metrics = api.rstrip("/"), metrics.rstrip("/")

    expect_ok(f"{api}/health")
    log(f"ok   {api}/health")

    listed = [m["id"] for m in json.loads(expect_ok(f"{api}/v1/models"))["data"]]
    if not listed:
        raise SmokeError("/v1/models lists no model")
    if model is None:
        model = listed[0]
    elif model not in listed:
        raise SmokeError(f"/v1/models lists {listed}, not {model}")
    log(f"ok   /v1/models: {listed}")

    before = None
    if compression:
        text = expect_ok(f"{metrics}/metrics")
        before = counter_total(text, "vllm_kvcomp_requests_compressed_total")

    completion = json.loads(
        expect_ok(
            f"{api}/v1/completions",
            {
                "model": model,
                "prompt": LONG_PROMPT,
                "max_tokens": 8,
                "temperature": 0,
            },
        )
    )
    if not completion.get("choices") or "text" not in completion["choices"][0]:
        raise SmokeError(f"/v1/completions: no text in {completion}")
    usage = completion.get("usage", {})
    log(f"ok   /v1/completions: {usage.get('prompt_tokens')} prompt tokens -> {completion['choices'][0]['text']!r}")

    if chat:
        reply = json.loads(
            expect_ok(
                f"{api}/v1/chat/completions",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 8,
                },
            )
        )
        if not reply.get("choices") or "message" not in reply["choices"][0]:
            raise SmokeError(f"/v1/chat/completions: no message in {reply}")
        log("ok   /v1/chat/completions")

    vllm_metrics = expect_ok(f"{api}/metrics")
    if "vllm:" not in vllm_metrics:
        raise SmokeError(f"{api}/metrics has no vllm:* metrics")
    log(f"ok   {api}/metrics (vLLM)")

    kvcomp = expect_ok(f"{metrics}/metrics")
    missing = [name for name in KVCOMP_METRICS if not re.search(rf"^# TYPE {re.escape(name)}\b", kvcomp, re.M)]
    if missing:
        raise SmokeError(f"{metrics}/metrics does not declare {missing}")
    log(f"ok   {metrics}/metrics (plugin): {', '.join(KVCOMP_METRICS)}")

    if compression:
        after = counter_total(kvcomp, "vllm_kvcomp_requests_compressed_total")
        if not after > before:
            raise SmokeError(
                f"vllm_kvcomp_requests_compressed_total stayed at {after} after a "
                f"{usage.get('prompt_tokens')}-token prompt: compression did not run"
            )
        kept = counter_total(kvcomp, "vllm_kvcomp_tokens_kept_total")
        evicted = counter_total(kvcomp, "vllm_kvcomp_tokens_evicted_total")
        ratio = f"{kept / (kept + evicted):.3f}" if kept + evicted else "n/a"
        log(f"ok   compression ran: requests {before:g} -> {after:g}, kept fraction so far {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of the OpenAI API")
    parser.add_argument("--metrics", default="http://127.0.0.1:9464", help="base URL of the plugin's exporter")
    parser.add_argument("--model", help="model name to use (default: the first of /v1/models)")
    parser.add_argument("--no-chat", action="store_true", help="skip /v1/chat/completions (no chat template)")
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="do not require the compressed-requests counter to grow (--kv-compression none)",
    )
    args = parser.parse_args(argv)
    try:
        run(args.api, args.metrics, args.model, chat=not args.no_chat, compression=not args.no_compression)
    except SmokeError as err:
        print(f"FAIL {err}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
