"""The chaos run's plan, client behaviour and verdict (the GPU runs are in bench/results/chaos.json)."""

import asyncio
from types import SimpleNamespace

import pytest

from bench import chaos


def _args(**kw):
    return chaos.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_plan_is_reproducible_and_has_the_asked_shares():
    args = _args(requests=2000, tp=2, seed=5)
    plan = chaos.plan_requests(args, ["uniform", "zigzag"])
    again = chaos.plan_requests(args, ["uniform", "zigzag"])
    assert [(p.request_id, p.prompt_len, p.extra_args, p.abort) for p in plan] == [
        (p.request_id, p.prompt_len, p.extra_args, p.abort) for p in again
    ]
    assert all(args.min_len <= p.prompt_len <= args.max_len for p in plan)
    aborted = sum(p.abort is not None for p in plan) / len(plan)
    assert 0.25 < aborted < 0.35
    assert 0.01 < sum(p.bad for p in plan) / len(plan) < 0.04
    faults = [p.request_id for p in plan if "kvfault" in p.request_id]
    assert faults and any("rank1" in f for f in faults)
    assert not any(p.bad and p.abort for p in plan)  # a refused request has nothing to abort
    none = sum((p.extra_args or {}).get("kv_compression") == "none" for p in plan if not p.bad)
    assert 0.1 < none / len(plan) < 0.2


def test_rank1_faults_only_with_tensor_parallel():
    plan = chaos.plan_requests(_args(requests=2000, tp=1), ["uniform"])
    assert not any("rank1" in p.request_id for p in plan)


class _FakeLLM:
    """AsyncLLM.generate's contract: a stream of cumulative outputs; refusals raise ValueError."""

    def __init__(self, delay=0.0):
        self.delay, self.closed = delay, []

    def generate(self, prompt, params, request_id):
        async def stream():
            try:
                if "kv_budjet" in (params.extra_args or {}):
                    raise ValueError("kv_budjet (request): unknown key")
                for n in range(1, params.max_tokens + 1):
                    await asyncio.sleep(self.delay)
                    yield SimpleNamespace(
                        outputs=[SimpleNamespace(token_ids=list(range(n)), finish_reason="length")],
                        finished=n == params.max_tokens,
                    )
            finally:
                self.closed.append(request_id)

        return stream()


@pytest.mark.parametrize(
    ("abort", "extra", "expect"),
    [
        (None, None, {"finished": True, "tokens": 6}),
        (("tokens", 2.0), None, {"aborted": True, "tokens": 2}),
        (("time", 0.05), None, {"aborted": True}),
        (None, {"kv_budjet": 0.2}, {"refused": "kv_budjet (request): unknown key"}),
    ],
)
def test_client_finishes_aborts_or_is_refused(abort, extra, expect):
    llm = _FakeLLM(delay=0.02)
    req = chaos.Planned("chaos-1", 16, 6, extra, arrival_s=0.0, abort=abort, bad=extra is not None)
    out = asyncio.run(chaos.run_one(llm, req, t0=0.0))
    for key, value in expect.items():
        assert out[key] == value
    assert llm.closed == ["chaos-1"]  # the stream is closed: AsyncLLM aborts on close
    assert not ("finished" in out and "aborted" in out)


def _outcomes(plan, **override):
    outs = []
    for p in plan:
        o = {"id": p.request_id, "planned_abort": p.abort is not None, "bad": p.bad, "tokens": p.max_tokens}
        if p.bad:
            o.update(refused="x", tokens=0)
        elif p.abort:
            o["aborted"] = True
        else:
            o["finished"] = True
        outs.append(o)
    outs[0].update(override)
    return outs


def _verdict(outcomes, plan):
    result = chaos.check(outcomes, plan)
    result.update(engine_alive=True, idle_pool_empty=True, self_check={"exact": 3, "mismatch": 0})
    return result


def test_verdict_passes_a_clean_run_and_fails_each_broken_invariant():
    plan = chaos.plan_requests(_args(requests=300), ["uniform"])
    plain = next(i for i, p in enumerate(plan) if not p.bad and not p.abort)
    plan.insert(0, plan.pop(plain))
    assert chaos.passed(_verdict(_outcomes(plan), plan))
    assert not chaos.passed(_verdict(_outcomes(plan, tokens=0), plan))  # cut short, not aborted
    assert not chaos.passed(_verdict(_outcomes(plan, finished=False), plan))
    assert not chaos.passed(_verdict(_outcomes(plan, engine_dead="dead"), plan))
    assert not chaos.passed(_verdict(_outcomes(plan, refused="no"), plan))  # a good request refused
    broken = _verdict(_outcomes(plan), plan)
    broken["idle_pool_empty"] = False  # a leaked block
    assert not chaos.passed(broken)
    broken = _verdict(_outcomes(plan), plan)
    broken["self_check"] = {"exact": 3, "mismatch": 1}
    assert not chaos.passed(broken)


def test_kv_pool_is_sized_from_the_model_shape():
    from evaluation.random_model import kv_bytes_per_token

    assert kv_bytes_per_token("llama-tiny") == 16 * 2 * 2 * 64 * 2  # 8 KiB: 16 layers, 2 KV heads of 64, bf16
    assert kv_bytes_per_token("llama-1b") == 32 << 10  # README: 32 KiB of KV per token
