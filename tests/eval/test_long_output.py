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
