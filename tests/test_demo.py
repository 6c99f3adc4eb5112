"""The demo's token marking (``--show``): labels from the engine's own steps."""

from __future__ import annotations

import pytest

from vllm_cmasd.demo import ACCEPTED, BONUS, CORRECTION, TARGET, label_tokens, render


def test_labels_follow_each_steps_outcome():
    steps = [(1, 0, 0), (3, 4, 2), (5, 4, 4), (1, 2, 0), (2, 3, 2)]  # last one cut by max_tokens
    assert label_tokens(steps) == (
        [TARGET] + [ACCEPTED] * 2 + [CORRECTION] + [ACCEPTED] * 4 + [BONUS] + [CORRECTION] + [ACCEPTED] * 2
    )


def test_render_marks_tokens_without_colour_and_colours_them_with():
    pieces, labels = ["a", "b", "c", "d"], [TARGET, ACCEPTED, CORRECTION, BONUS]
    assert render(pieces, labels, colour=False) == "a[b]<c>{d}"
    coloured = render(pieces, labels, colour=True)
    assert coloured.startswith("a\033[32mb\033[0m") and "\033[" in coloured


@pytest.mark.engine
def test_trace_accounts_for_every_emitted_and_accepted_token(tiny_pair):
    from vllm import LLM

    from test_engine import CMASD, PROMPTS, engine, greedy
    from vllm_cmasd.engines import model_runner, shutdown, spec_decode_counters

    target, draft = tiny_pair
    llm = LLM(**engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD))
    try:
        drafter = model_runner(llm).drafter
        drafter.trace = {}
        outputs = llm.generate(PROMPTS, greedy(24), use_tqdm=False)
        counters = spec_decode_counters(llm)
    finally:
        shutdown(llm)
    labels = {}
    for req_id, steps in drafter.trace.items():
        labels[req_id.split("-")[0]] = label_tokens(steps)
    for out in outputs:
        # The last step may sample past max_tokens; vLLM drops the excess.
        assert len(labels[out.request_id]) >= len(out.outputs[0].token_ids)
    # Every verification vLLM counted is in the trace, with its outcome.
    steps = [step for row in drafter.trace.values() for step in row if step[1]]
    assert len(steps) == counters["num_drafts"] > 0
    assert sum(accepted for _, _, accepted in steps) == counters["num_accepted_tokens"] > 0
    all_labels = [label for row in labels.values() for label in row]
    assert ACCEPTED in all_labels and (CORRECTION in all_labels or BONUS in all_labels)
