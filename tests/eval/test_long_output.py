"""The long-output task of issue #12: rules, per-item scoring and the agreement curve."""

from evaluation.long_output import agreement_curve, item_accuracy, make_task


def _right_answer(task, upto=None):
    return "\n".join(task.expected(n) for n in range(1, (upto or task.num_items) + 1))


def test_rules_are_stated_once_early_and_answers_are_not_in_the_prompt():
    filler = [f"Sentence number {i} says nothing." for i in range(200)]
    task = make_task(seed=1, num_items=120, filler=filler)
    assert sorted(task.rules) == list(range(10)) and len(set(task.rules.values())) == 10
    for word in task.rules.values():
        assert task.prompt.count(word) == 1
        assert task.prompt.index(word) < len(task.prompt) // 4  # early
    assert task.expected(105) == f"105: {task.rules[5]}" and task.expected(20) == f"20: {task.rules[0]}"
    assert "15: " not in task.prompt  # no line of the answer
    assert make_task(seed=1, num_items=120, filler=filler).rules == task.rules
    assert any(make_task(seed=s).rules != task.rules for s in range(2, 6))


def test_items_are_scored_one_by_one():
    task = make_task(seed=2, num_items=30)
    assert all(task.score(_right_answer(task)))
    lines = _right_answer(task).splitlines()
    lines[14] = "15: WRONG"  # one wrong line
    del lines[20]  # one missing line
    right = task.score("\n".join(lines) + "\nsome trailing text")
    assert sum(right) == 28 and not right[14] and not right[20]
    assert item_accuracy([task], ["\n".join(lines)]) == 28 / 30
    assert item_accuracy([task], ["\n".join(lines)], last_items=10) == 9 / 10
    assert task.score("") == [False] * 30


def test_agreement_curve_follows_the_first_divergence():
    ref = [list(range(100)), list(range(100))]
    out = [list(range(100)), list(range(50)) + [0] * 50]
    curve = agreement_curve(out, ref, points=4)
    assert [c["position"] for c in curve] == [25, 50, 75, 100]
    assert [c["agreement"] for c in curve] == [1.0, 1.0, 0.5, 0.5]
    short = agreement_curve([[1, 2]], [[1, 2]], points=2)
    assert [c["agreement"] for c in short] == [1.0, 1.0]
    assert agreement_curve([[1]], [[]]) == []


def test_vllm_runner_builds_full_and_budget_requests_and_summarizes(tiny_model):
    """The GPU runner's bookkeeping on CPU: one full-KV request and one per budget for each prompt;
    scores, last-quarter scores and the agreement curve per budget."""
    from transformers import AutoTokenizer

    from evaluation.long_output_vllm import requests_for, summarize

    tasks = [make_task(seed=3, num_items=8, index=i) for i in range(2)]
    reqs = requests_for(tasks, AutoTokenizer.from_pretrained(tiny_model), [1024.0, 2048.0])
    assert [key for _, _, key in reqs] == [(0, None), (0, 1024.0), (0, 2048.0), (1, None), (1, 1024.0), (1, 2048.0)]
    assert reqs[0][1] == {"kv_compression": "none"} and reqs[1][1] == {"kv_budget": 1024.0}
    # token ids, not the keys of a BatchEncoding (what transformers 5's apply_chat_template(tokenize=True) returns)
    assert all(isinstance(i, int) for ids, _, _ in reqs for i in ids) and len(reqs[0][0]) > 20
    right = {t: _right_answer(task) for t, task in enumerate(tasks)}
    texts = {key: right[key[0]] for _, _, key in reqs}
    texts[(1, 1024.0)] = "\n".join(right[1].splitlines()[:6])  # the last two items lost
    tokens = {key: [1, 2, 3, 4] for _, _, key in reqs}
    tokens[(1, 1024.0)] = [1, 2, 9, 9]
    results = summarize(tasks, texts, tokens, [1024.0, 2048.0])
    assert [r["budget"] for r in results] == [1024.0, 2048.0]
    assert results[1]["score"] == results[1]["full_score"] == 1.0
    assert results[0]["score"] == (1.0 + 6 / 8) / 2 and results[0]["score_last_quarter"] == 0.5
    assert results[0]["agreement"][-1]["agreement"] == 0.5
    # paired over prompts against full KV: prompt 1 lost a quarter of its items
    assert results[0]["per_prompt"] == [1.0, 0.75] and results[0]["full_per_prompt"] == [1.0, 1.0]
    assert results[0]["delta_vs_full"] == -0.125
    lo, hi = results[0]["delta_vs_full_ci95"]
    assert -0.25 <= lo <= -0.125 <= hi <= 0.0
    assert results[1]["delta_vs_full"] == 0.0 and results[1]["delta_vs_full_ci95"] == [0.0, 0.0]


def test_answer_tokens_hold_the_whole_correct_answer(tiny_model):
    """max_tokens comes from the tokenizer: the whole correct answer fits (the first GPU run's fixed
    6 tokens per line cut Qwen2.5's answers at about half their items)."""
    from transformers import AutoTokenizer

    from evaluation.long_output import answer_tokens, expected_answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    task = make_task(seed=1, num_items=300)
    need = len(tokenizer.encode(expected_answer(task), add_special_tokens=False))
    assert need < answer_tokens(task, tokenizer) < 1.3 * need + 64
    assert all(task.score(expected_answer(task)))
    assert answer_tokens(task) >= 12 * 300  # without a tokenizer: a generous fixed rate


def test_answers_are_greedy_and_never_end_early():
    """The end-of-sequence tokens are masked until the whole answer is written (min_tokens), not
    sampled and then ignored; vLLM's SamplingParams takes these arguments."""
    from vllm import SamplingParams

    from evaluation.long_output_vllm import greedy_whole_answer

    kwargs = greedy_whole_answer(5000)
    assert kwargs["min_tokens"] == kwargs["max_tokens"] == 5000 and kwargs["temperature"] == 0.0
    params = SamplingParams(**kwargs, extra_args={"kv_budget": 1024.0})
    assert params.min_tokens == params.max_tokens == 5000 and params.ignore_eos
