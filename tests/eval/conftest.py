"""Fixtures of the evaluation tests: a tiny random Llama and a fake vLLM engine."""

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.LLM replaced by a recorder: each prompt is answered right when its request keeps
    full KV or a budget >= 0.5, and "no idea" otherwise. `seen` holds the engine's kwargs, every
    generate call's requests (`calls`) and the answers by prompt ids; `seen["fail_on_call"] = n`
    makes the n-th generate call (0-based) raise, as a run stopped mid-way."""
    import vllm

    import vllm_kvcomp.calibration_data as tasks
    from vllm_kvcomp.config import from_additional_config, request_config

    seen: dict = {"calls": [], "answers": {}}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            if seen.get("fail_on_call") == len(seen["calls"]):
                raise RuntimeError("engine died")
            seen["calls"].append(list(zip(prompts, params, strict=True)))
            server = from_additional_config(seen["kwargs"]["additional_config"])
            outs = []
            for prompt, p in zip(prompts, params, strict=True):
                args = p.extra_args
                config = request_config(server, args)  # what the worker will do (methods and presets)
                full, budget = not config.enabled, config.budget
                answer = seen["answers"][tuple(prompt["prompt_token_ids"])]
                text = answer if (full or budget >= 0.5) else "no idea"
                outs.append(type("O", (), {"outputs": [type("C", (), {"text": text})()]})())
            return outs

    original_suite = tasks.TaskGenerator.suite

    def recording_suite(self, *args, **kwargs):
        samples = original_suite(self, *args, **kwargs)
        for s in samples:
            head, question = tasks.chat_prompt(self.tokenizer, s)
            ids = self.tokenizer(head + question, add_special_tokens=False)["input_ids"]
            seen["answers"][tuple(ids)] = " ".join(s.answers)
        return samples

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(tasks.TaskGenerator, "suite", recording_suite)
    return seen
