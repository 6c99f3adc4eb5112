"""How much can any draft-length rule gain over a fixed k with this drafter? A replay.

Issue 18 asks the controller for 1.15x vLLM's best fixed k at batch 1. Whether
that is reachable depends on the drafter: a rule that picks each draft's
length can only gain where its signals tell long accepted runs from short
ones. This module measures that bound.

1. :func:`record_drafts` runs CM-ASD's window at threshold 0 (every request
   drafts k_max tokens every step) and keeps, per draft, the drafter's
   confidence at each position and how many of the tokens the target accepted.
2. :func:`fit_step_costs` reads a step's cost in units of a plain step from a
   benchmark's fixed-k rows of the same machine: a fixed-k step emits
   ``acceptance length`` tokens in ``acceptance length / speedup`` plain steps.
3. :func:`replay` scores a rule on the recorded drafts: a draft of ``n`` tokens
   emits ``min(accepted, n) + 1`` tokens (greedy, exact verification: a shorter
   draft is the same draft's prefix) at that cost.

The rules (:func:`rule_families`): fixed k; the paper's window (stop after
the first position whose running product or mean of confidences is below a
threshold); a survival rule (keep drafting while the product of calibrated
acceptances is above a threshold; the calibration is fitted on the same
drafts, in hindsight); gates known before the first pass (the target's
confidence in its last token, the request's previous draft) in front of them;
the oracle (draft exactly what will be accepted). :class:`StaticBatch` replays
the benchmark's batches above 1, which end with their slowest request. Each
family's parameter is chosen in hindsight on the same drafts, so every
figure but fixed k's is an upper bound on what that family reaches on the
real engine. Two ways of charging a rule that stops: ``free stops`` charges
only the tokens it keeps (no pass to learn a draft is empty, none for a
dropped token); ``charged`` adds a drafted token's marginal cost for each pass
whose token it dropped (its verification's share included: a slight
over-charge), but not the fixed cost of a verifying step where it keeps none.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_cmasd.calibration import AcceptanceCalibration


@dataclass(frozen=True)
class Draft:
    """One request's draft of k_max tokens and the verifier's verdict."""

    confidences: tuple[float, ...]
    accepted: int
    target_confidence: float | None = None
    """Known before this draft's first pass: the target's max probability where it
    emitted the request's last token (the previous verification's correction or
    bonus); None after a prefill."""
    previous_accepted: int | None = None
    """Known before this draft's first pass: how many tokens of the request's previous
    full-length draft the target accepted; None for its first."""


@dataclass(frozen=True)
class StepCosts:
    """A step's wall time in plain steps: 1 without drafts, ``1 + fixed + per_token * n`` with ``n`` drafted."""

    fixed: float
    per_token: float

    def step(self, drafted: int) -> float:
        return 1.0 if drafted == 0 else 1.0 + self.fixed + self.per_token * drafted


Rule = Callable[[Draft], tuple[int, int]]
"""A draft's length under the rule: (tokens kept, drafter passes run)."""


def fit_step_costs(rows: list[tuple[int, float, float]]) -> StepCosts:
    """Least squares of ``acceptance length / speedup = 1 + fixed + per_token * k`` over
    fixed-k rows ``(k, acceptance length, speedup vs plain)`` (at least two distinct k)."""
    _need_two_ks("fit_step_costs", rows)
    return _least_squares([(1.0, k) for k, _, _ in rows], [length / speedup - 1.0 for _, length, speedup in rows])


def _need_two_ks(name: str, rows: list[tuple[int, float, float]]) -> None:
    if len({k for k, _, _ in rows}) < 2:
        raise ValueError(f"{name}: need fixed-k rows at two or more k, got {rows}")


def _least_squares(xs: list[tuple[float, float]], ys: list[float]) -> StepCosts:
    """``ys ~ fixed * x0 + per_token * x1`` over the rows ``xs``."""
    solution = torch.linalg.lstsq(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)[:, None])
    fixed_cost, per_token = solution.solution[:, 0].tolist()
    return StepCosts(fixed=fixed_cost, per_token=per_token)


def replay(drafts: list[Draft], rule: Rule, costs: StepCosts, *, charged: bool = False) -> float:
    """Speedup over plain decoding of ``rule`` on ``drafts`` (tokens per plain-step time);
    ``charged``: each pass whose token was dropped adds ``per_token``."""
    tokens = time = 0.0
    for draft in drafts:
        kept, passes = rule(draft)
        tokens += min(draft.accepted, kept) + 1
        time += costs.step(kept) + (costs.per_token * (passes - kept) if charged else 0.0)
    return tokens / time


def fixed(k: int) -> Rule:
    return lambda draft: (k, k)


def oracle(draft: Draft) -> tuple[int, int]:
    return draft.accepted, draft.accepted


def window(threshold: float, stop_rule: str) -> Rule:
    """The paper's window at k_min 1: a position is kept, and drafting stops after
    the first whose running product (or mean) of confidences is below ``threshold``."""

    def rule(draft: Draft) -> tuple[int, int]:
        signal = 1.0
        for j, confidence in enumerate(draft.confidences):
            signal = signal * confidence if stop_rule == "product" else (signal * j + confidence) / (j + 1)
            if signal < threshold:
                return j + 1, j + 1
        return len(draft.confidences), len(draft.confidences)

    return rule


def survival(threshold: float, acceptance: Callable[[float], float]) -> Rule:
    """Keep position j while the product of the calibrated acceptances up to j is at
    least ``threshold``; the pass that drafted the first token below it ran."""

    def rule(draft: Draft) -> tuple[int, int]:
        alive = 1.0
        for j, confidence in enumerate(draft.confidences):
            alive *= acceptance(confidence)
            if alive < threshold:
                return j, j + 1
        return len(draft.confidences), len(draft.confidences)

    return rule


def gated(threshold: float, rule: Rule) -> Rule:
    """No pass at all where the target's confidence before the draft is below
    ``threshold`` (decided before the first pass); otherwise ``rule``."""

    def gated_rule(draft: Draft) -> tuple[int, int]:
        if draft.target_confidence is not None and draft.target_confidence < threshold:
            return 0, 0
        return rule(draft)

    return gated_rule


def after_a_miss(rule: Rule) -> Rule:
    """No pass at all right after a draft whose first token was rejected; otherwise ``rule``."""

    def history_rule(draft: Draft) -> tuple[int, int]:
        return (0, 0) if draft.previous_accepted == 0 else rule(draft)

    return history_rule


def hindsight_calibration(drafts: list[Draft]) -> Callable[[float], float]:
    """P(accepted | confidence), fitted on every position the verifier reached."""
    calibration = AcceptanceCalibration(decay=1.0)
    confidences, outcomes = [], []
    for draft in drafts:
        reached = min(draft.accepted + 1, len(draft.confidences))
        confidences += draft.confidences[:reached]
        outcomes += [j < draft.accepted for j in range(reached)]
    calibration.observe(torch.tensor(confidences), torch.tensor(outcomes))
    return lambda confidence: float(calibration.predict(torch.tensor([confidence]))[0])


THRESHOLDS = tuple(round(0.02 * i, 2) for i in range(51))
GATES = tuple(round(0.05 * i, 2) for i in range(21))


def rule_families(drafts: list[Draft]) -> dict[str, dict[str, Rule]]:
    """Each family's rules by their parameter (the oracle: one rule)."""
    k_max = len(drafts[0].confidences)
    acceptance = hindsight_calibration(drafts)
    families = {
        "fixed k": {f"k={k}": fixed(k) for k in range(1, k_max + 1)},
        "window, product": {f"threshold {t}": window(t, "product") for t in THRESHOLDS},
        "window, mean": {f"threshold {t}": window(t, "mean") for t in THRESHOLDS},
        "survival (hindsight calibration)": {f"threshold {t}": survival(t, acceptance) for t in THRESHOLDS},
    }
    if any(d.target_confidence is not None for d in drafts):
        coarse = THRESHOLDS[::2]
        families["target gate, then fixed k"] = {
            f"gate {g}, k={k}": gated(g, fixed(k)) for g in GATES for k in range(1, k_max + 1)
        }
        families["target gate, then window product"] = {
            f"gate {g}, threshold {t}": gated(g, window(t, "product")) for g in GATES for t in coarse
        }
        families["target gate, then survival"] = {
            f"gate {g}, threshold {t}": gated(g, survival(t, acceptance)) for g in GATES for t in coarse
        }
    if any(d.previous_accepted is not None for d in drafts):
        families["history: none after a miss, then window product"] = {
            f"threshold {t}": after_a_miss(window(t, "product")) for t in THRESHOLDS
        }
        families["history: none after a miss, then survival"] = {
            f"threshold {t}": after_a_miss(survival(t, acceptance)) for t in THRESHOLDS
        }
    families["oracle"] = {"draft what is accepted": oracle}
    return families


@dataclass(frozen=True)
class StaticBatch:
    """The benchmark's batch above 1: ``size`` requests of ``tokens`` tokens each, started
    together; the batch ends with its slowest request, so tokens accepted for the others
    shorten nothing while their drafting still costs."""

    size: int
    tokens: int
    trials: int = 200
    seed: int = 0


def speedup(drafts: list[Draft], rule: Rule, costs: StepCosts, *, charged: bool = False,
            batch: StaticBatch | None = None) -> float:
    """``rule``'s speedup over plain decoding: one request at a time, or a static ``batch``."""
    if batch is None:
        return replay(drafts, rule, costs, charged=charged)
    return static_batch_replay(drafts, rule, costs, batch, charged=charged)


def headroom(drafts: list[Draft], costs: StepCosts, *, charged: bool = False,
             batch: StaticBatch | None = None) -> list[dict]:
    """Each family's best rule in hindsight: its speedup over plain and over the best fixed k
    (one request at a time, or a static ``batch``)."""
    best = []
    for family, rules in rule_families(drafts).items():
        scores = {name: speedup(drafts, rule, costs, charged=charged, batch=batch) for name, rule in rules.items()}
        name = max(scores, key=scores.__getitem__)
        best.append({"family": family, "best": name, "speedup_vs_plain": scores[name]})
    fixed_best = best[0]["speedup_vs_plain"]
    for row in best:
        row["vs_best_fixed_k"] = row["speedup_vs_plain"] / fixed_best
    return best


def _static_batch_steps(drafts: list[Draft], rule: Rule, batch: StaticBatch, *, charged: bool) -> tuple[float, float, float]:
    """Averaged over trials: (steps, verifying steps, drafted tokens per request slot) of a static
    batch whose requests draw recorded drafts at random each step."""
    rng = random.Random(batch.seed)
    picks = [rule(d) for d in drafts]
    steps = verifying = drafted = 0.0
    for _ in range(batch.trials):
        left = [batch.tokens] * batch.size
        while any(n > 0 for n in left):
            kept_any = False
            for i, n in enumerate(left):
                if n <= 0:
                    continue
                j = rng.randrange(len(drafts))
                kept, passes = picks[j]
                left[i] -= min(drafts[j].accepted, kept) + 1
                drafted += (passes if charged else kept) / batch.size
                kept_any |= kept > 0
            steps += 1
            verifying += kept_any
    return steps / batch.trials, verifying / batch.trials, drafted / batch.trials


def static_batch_replay(drafts: list[Draft], rule: Rule, costs: StepCosts, batch: StaticBatch, *,
                        charged: bool = False) -> float:
    """Speedup over plain decoding (``batch.tokens`` steps) of ``rule`` on a static batch: a step
    costs 1, plus ``fixed`` where any request verifies drafts, plus ``per_token`` per drafted
    token over the batch's size."""
    steps, verifying, drafted = _static_batch_steps(drafts, rule, batch, charged=charged)
    return batch.tokens / (steps + costs.fixed * verifying + costs.per_token * drafted)


def fit_static_batch_costs(drafts: list[Draft], rows: list[tuple[int, float, float]], batch: StaticBatch) -> StepCosts:
    """The step costs under which the static-batch replay of each fixed k gives that row's measured
    speedup (least squares; the rows' acceptance lengths are the replay's own)."""
    _need_two_ks("fit_static_batch_costs", rows)
    xs, ys = [], []
    for k, _, speedup in rows:
        steps, verifying, drafted = _static_batch_steps(drafts, fixed(k), batch, charged=False)
        xs.append((verifying, drafted))
        ys.append(batch.tokens / speedup - steps)
    return _least_squares(xs, ys)


def acceptance_profile(drafts: list[Draft]) -> list[float]:
    """P(accepted run >= j) for j = 1..k_max."""
    k_max = len(drafts[0].confidences)
    return [sum(d.accepted >= j for d in drafts) / len(drafts) for j in range(1, k_max + 1)]


def record_drafts(target: str, draft: str, prompts: list[str], *, max_tokens: int, k_max: int = 8,
                  draft_method: str = "draft_model") -> list[Draft]:
    """Every full-length draft of a greedy chat over ``prompts`` (sent at once) at k_max."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the drafter lives in this process
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs, model_runner, shutdown

    cmasd = {"verification": "exact", "draft_length": "window", "threshold": 0.0, "calibration": "none"}
    llm = LLM(**llm_kwargs(target, draft=draft, draft_method=draft_method, num_speculative_tokens=k_max, cmasd=cmasd))
    drafts: list[Draft] = []
    try:
        runner = model_runner(llm)
        drafter, sampler = runner.drafter, runner.rejection_sampler
        observe, verify = drafter.observe_verification, sampler.forward
        # Per request, the target's confidence where it emitted its last token:
        # this step's rows (set by verifying, read by recording) and the previous step's.
        rows: dict[str, torch.Tensor] = {}
        before: dict[str, float] = {}
        previous: dict[str, int] = {}

        def verifying(metadata, draft_probs, logits, sampling_metadata):
            target = torch.softmax(logits[metadata.target_logits_indices].float(), -1).amax(-1)
            bonus = torch.softmax(logits[metadata.bonus_logits_indices].float(), -1).amax(-1)
            starts = [0] + metadata.cu_num_draft_tokens.tolist()
            for i, req_id in enumerate(runner.input_batch.req_ids[:len(metadata.num_draft_tokens)]):
                rows[req_id] = torch.cat([target[starts[i]:starts[i + 1]], bonus[i:i + 1]])
            return verify(metadata, draft_probs, logits, sampling_metadata)

        def recording(req_ids, num_draft_tokens, num_accepted):
            for req_id, drafted, accepted in zip(req_ids, num_draft_tokens, num_accepted.tolist()):
                entry = drafter._signals.get(req_id)
                if drafted == k_max and entry is not None and entry["confidence"].numel() == k_max:
                    drafts.append(Draft(tuple(entry["confidence"].tolist()), int(accepted), before.get(req_id),
                                        previous.get(req_id)))
                    previous[req_id] = int(accepted)
                if req_id in rows:  # the emitted token came from the row after the accepted ones
                    before[req_id] = float(rows[req_id][min(int(accepted), drafted)])
            observe(req_ids, num_draft_tokens, num_accepted)

        drafter.observe_verification = recording
        sampler.forward = verifying
        llm.chat([[{"role": "user", "content": p}] for p in prompts],
                 SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    finally:
        shutdown(llm)
    if not drafts:
        raise RuntimeError("record_drafts: no full-length draft was verified")
    return drafts


def format_table(rows: list[dict]) -> str:
    lines = ["| rule family | best in hindsight | speedup vs plain | vs best fixed k |", "|---|---|---:|---:|"]
    lines += [f"| {r['family']} | {r['best']} | {r['speedup_vs_plain']:.3f} | {r['vs_best_fixed_k']:.3f} |"
              for r in rows]
    return "\n".join(lines)

