"""Skipping the drafter, and catching its KV cache up afterwards.

vLLM runs the drafter's first pass on every step, also when nothing is
drafted, to write the drafter's KV cache for the tokens the target just
verified. CM-ASD skips the drafter on a step where drafting does not pay; the
requests of that step then *lag*: the drafter's KV cache is valid only below
their lag start ``F`` (a position). The next step that drafts for a request
first runs its missed tokens ``F .. num_computed - 1`` in the same first pass:
they are prepended to the request's query (token ids from the request's
committed tokens, consecutive positions, their KV slots from the request's
block table), a prefill-like pass. A draft model needs nothing else. An EAGLE
head's KV at position p is a function of the target's hidden states at p,
which the runner drops after each step: :class:`DirtySlots` keeps them, per
KV slot, for the tokens the head has not run.

Which slots hold drafter garbage is tracked per KV slot (:class:`DirtySlots`):
every slot the target writes is dirty until a drafter pass writes it too. So

* a request first seen with computed tokens (a prefix-cache hit), or whose
  computed tokens went backwards (preempted, then resumed with recompute),
  lags from its first dirty cached position: blocks filled while the drafter
  skipped, also by another request of the same step;
* a lagging request that does not draft on a step that runs the drafter: it
  does not catch up (only requests that draft pay for one), runs its own
  tokens and keeps its lag start;
* a catch-up that does not fit the drafter's token buffer this step: that
  request runs the next chunk of its missed tokens instead of its own (a split
  catch-up) and drafts nothing; with no room at all it runs its own tokens,
  drafts nothing and keeps its lag start (the gap is covered later).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CatchUpPlan:
    """One first pass's catch-up, per request in batch order.

    ``missed[i]`` tokens from position ``start[i]`` go into the first pass. A
    full catch-up runs them before the request's own tokens; a ``partial``
    one (too many missed tokens for the pass) runs only them, with the
    committed token after them as the pass's new token, instead of the
    request's own tokens: a split catch-up, continued on later steps. A
    request with a partial catch-up, or ``blocked`` without room for any,
    drafts nothing this step.
    """

    start: np.ndarray  # [batch] int64: first position to run (the lag start, or num_computed)
    missed: np.ndarray  # [batch] int64: tokens to run from start (0: none)
    partial: np.ndarray  # [batch] bool
    blocked: np.ndarray  # [batch] bool: lags and drafts nothing this step

    @property
    def num_tokens(self) -> int:
        return int(self.missed.sum())

    def query_lens(self, own_lens: np.ndarray) -> np.ndarray:
        """Each request's first-pass query with the catch-ups, from its own query length."""
        return np.where(self.partial, self.missed, own_lens + self.missed)


def token_slots(block_table: np.ndarray, block_size: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The KV slots of positions ``starts[i] .. ends[i] - 1`` of each request
    (row ``i`` of the host block table), concatenated in batch order."""
    lens = np.maximum(ends - starts, 0)
    rows = np.repeat(np.arange(len(lens)), lens)
    offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    positions = np.repeat(starts, lens) + offsets
    return block_table[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size


class DirtySlots:
    """KV slots whose drafter KV is stale: the target wrote them since the
    drafter last did. With ``keep_hidden_states`` (an EAGLE head) also, per
    slot, the target's hidden states of its token as last written, on the
    host: what a catch-up feeds the head for positions it missed."""

    def __init__(self, keep_hidden_states: bool):
        self.dirty = np.zeros(0, dtype=bool)
        self.keep_hidden_states = keep_hidden_states
        self.hidden_states: torch.Tensor | None = None

    def _fit(self, slots: np.ndarray, like: torch.Tensor | None) -> None:
        need = int(slots.max()) + 1 if len(slots) else 0
        if need > len(self.dirty):  # slots are block ids x block size: grow to the largest seen, doubling
            size = max(need, 2 * len(self.dirty))
            self.dirty = np.concatenate([self.dirty, np.zeros(size - len(self.dirty), dtype=bool)])
        if like is not None and (self.hidden_states is None or need > len(self.hidden_states)):
            grown = torch.empty((len(self.dirty), like.shape[-1]), dtype=like.dtype, device="cpu")
            if self.hidden_states is not None:
                grown[: len(self.hidden_states)] = self.hidden_states
            self.hidden_states = grown

    def target_wrote(self, slots: np.ndarray, hidden_states: torch.Tensor | None) -> None:
        """The target's step writes these slots (``hidden_states``: its rows for them, in order)."""
        keep = hidden_states if self.keep_hidden_states else None
        self._fit(slots, keep)
        self.dirty[slots] = True
        if keep is not None and len(slots):
            assert self.hidden_states is not None
            self.hidden_states[torch.from_numpy(slots)] = keep[: len(slots)].to("cpu", non_blocking=True)

    def drafter_wrote(self, slots: np.ndarray) -> None:
        self._fit(slots, None)
        self.dirty[slots] = False

    def first_dirty(self, slots: np.ndarray) -> int:
        """Index of the first dirty slot (``len(slots)``: none)."""
        self._fit(slots, None)
        hits = np.flatnonzero(self.dirty[slots])
        return int(hits[0]) if len(hits) else len(slots)

    def hidden_states_of(self, slots: np.ndarray, device: torch.device) -> torch.Tensor:
        assert self.hidden_states is not None
        return self.hidden_states[torch.from_numpy(slots)].to(device)


class DrafterLag:
    """Per request, where the drafter's valid KV cache ends (only for those that lag)."""

    def __init__(self, max_tracked: int):
        self.lag_start: dict[str, int] = {}
        self._last_computed: dict[str, int] = {}
        self._max_tracked = max_tracked
        self.num_catch_up_tokens = 0
        self.num_split_passes = 0  # partial catch-ups run
        self.num_restarts = 0  # requests that lag on cached or recomputed tokens

    def observe(self, req_ids: list[str], num_computed: np.ndarray, first_dirty) -> None:
        """Before a step: find requests whose cached or recomputed KV is drafter garbage.
        ``first_dirty(i)``: request ``i``'s first position below its computed
        tokens whose drafter KV is stale (its computed tokens if none)."""
        for i, (req_id, computed) in enumerate(zip(req_ids, num_computed.tolist())):
            last = self._last_computed.get(req_id)
            fresh_with_cache = last is None and computed > 0
            recomputed = last is not None and computed < last
            if fresh_with_cache or recomputed:
                start = first_dirty(i)
                if start < computed:
                    self.lag_start[req_id] = start
                    self.num_restarts += 1
                else:
                    self.lag_start.pop(req_id, None)
            self._last_computed[req_id] = computed
        # Finished requests are never announced to the proposer: forget the oldest.
        while len(self._last_computed) > self._max_tracked:
            oldest = next(iter(self._last_computed))
            self._last_computed.pop(oldest)
            self.lag_start.pop(oldest, None)

    def skip(self, req_ids: list[str], num_computed: np.ndarray) -> None:
        """This step runs no drafter pass: every request lags from where it is now."""
        for req_id, computed in zip(req_ids, num_computed.tolist()):
            self.lag_start.setdefault(req_id, computed)

    def plan(self, req_ids: list[str], num_computed: np.ndarray, query_lens: np.ndarray, room: int,
             wanted: np.ndarray | None = None, cheapest_first: bool = False) -> CatchUpPlan:
        """Catch-ups in batch order (``cheapest_first``: shortest first) while
        they fit in ``room`` more tokens: full ones first come, first served;
        then partial ones in what is left plus the request's own tokens, which
        a partial catch-up replaces.

        ``wanted`` (bool per request; default all): only those catch up. A
        lagging request that is not wanted (it drafts nothing this step) is
        blocked: it runs its own tokens and keeps its lag start, so its catch-up,
        whenever it drafts again, rewrites what they wrote over its gap."""
        batch_size = len(req_ids)
        start = num_computed.astype(np.int64).copy()
        missed = np.zeros(batch_size, dtype=np.int64)
        partial = np.zeros(batch_size, dtype=bool)
        blocked = np.zeros(batch_size, dtype=bool)
        lag_starts = np.array([self.lag_start.get(req_id, n) for req_id, n in zip(req_ids, num_computed.tolist())])
        order = np.argsort(num_computed - lag_starts, kind="stable") if cheapest_first else range(batch_size)
        for i in order:
            req_id, lag_start = req_ids[i], int(lag_starts[i])
            if lag_start >= num_computed[i]:
                continue
            if wanted is not None and not wanted[i]:
                blocked[i] = True
                continue
            start[i] = lag_start
            behind = int(num_computed[i] - lag_start)
            if behind <= room:
                missed[i], room = behind, room - behind
                continue
            blocked[i] = True
            chunk = min(behind, room + int(query_lens[i]))
            if chunk > 0:
                missed[i], partial[i] = chunk, True
                room -= chunk - int(query_lens[i])
        return CatchUpPlan(start, missed, partial, blocked)

    def ran(self, req_ids: list[str], plan: CatchUpPlan, new_slots: int) -> None:
        """A first pass ran: requests that caught up (or never lagged) are current.
        ``new_slots``: KV a request's pass writes after its last token (a draft
        model writes its next token's, 1; an EAGLE head 0)."""
        for i, req_id in enumerate(req_ids):
            if plan.partial[i]:  # ran start .. start + missed - 1, then the committed token after them
                self.lag_start[req_id] = int(plan.start[i] + plan.missed[i] + new_slots)
                self.num_split_passes += 1
            elif not plan.blocked[i]:
                self.lag_start.pop(req_id, None)
        self.num_catch_up_tokens += plan.num_tokens


def with_catch_up(kwargs: dict, plan: CatchUpPlan, token_ids_cpu: np.ndarray, catch_up_slots: np.ndarray,
                  dirty: DirtySlots) -> dict:
    """``propose`` keyword arguments whose first pass runs the plan's catch-ups
    (``catch_up_slots``: their KV slots, in batch order).

    A catch-up is token ids, positions, slots and a longer (or, for a partial
    one, another) query; for an EAGLE head also the target's hidden states of
    those tokens, kept by ``dirty``. Rejected tokens stay at the end of each
    full query; a partial query has none, ends its sequence after its new
    token and takes that committed token as the request's next token.
    """
    cad = kwargs["common_attn_metadata"]
    old_ids, old_pos = kwargs["target_token_ids"], kwargs["target_positions"]
    device = old_ids.device
    query_start = cad.query_start_loc_cpu.numpy().astype(np.int64)
    query_lens = np.diff(query_start)
    partial = plan.partial
    new_lens = plan.query_lens(query_lens)
    new_start = np.concatenate([[0], np.cumsum(new_lens)])
    total = int(new_start[-1])

    # The request's own tokens, where kept: shifted by what runs before them.
    owner = np.repeat(np.arange(len(query_lens)), query_lens)
    kept = np.flatnonzero(~partial[owner])
    kept_dest = kept + (new_start[:-1] + plan.missed - query_start[:-1])[owner[kept]]
    # The caught-up tokens, at the front of each query.
    rows = np.flatnonzero(plan.missed)
    cu_dest = np.concatenate([new_start[i] + np.arange(plan.missed[i]) for i in rows])
    cu_pos = np.concatenate([plan.start[i] + np.arange(plan.missed[i]) for i in rows])
    cu_ids = np.concatenate([token_ids_cpu[i, plan.start[i] : plan.start[i] + plan.missed[i]] for i in rows])

    kept_t, kept_dest_t = torch.from_numpy(kept).to(device), torch.from_numpy(kept_dest).to(device)
    cu_dest_t = torch.from_numpy(cu_dest).to(device)

    def spliced(old: torch.Tensor, caught_up) -> torch.Tensor:
        """``old``'s kept rows and the catch-up rows, each at its place in the new query."""
        out = torch.empty((total, *old.shape[1:]), dtype=old.dtype, device=device)
        out[kept_dest_t] = old[kept_t]
        out[cu_dest_t] = torch.as_tensor(caught_up).to(device=device, dtype=old.dtype)
        return out

    slots = spliced(cad.slot_mapping[: len(old_ids)], catch_up_slots)
    kwargs = dict(kwargs, target_token_ids=spliced(old_ids, cu_ids), target_positions=spliced(old_pos, cu_pos))
    if dirty.keep_hidden_states:
        kwargs["target_hidden_states"] = spliced(
            kwargs["target_hidden_states"], dirty.hidden_states_of(catch_up_slots, device)
        )

    new_start_cpu = torch.from_numpy(new_start.astype(np.int32))
    changes = dict(
        slot_mapping=slots,
        query_start_loc=new_start_cpu.to(device),
        query_start_loc_cpu=new_start_cpu,
        num_actual_tokens=total,
        max_query_len=int(new_lens.max()),
        positions=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    if partial.any():
        rows_t = torch.from_numpy(np.flatnonzero(partial)).to(device)
        ends = plan.start[partial] + plan.missed[partial]  # the new token's position
        next_ids = kwargs["next_token_ids"].clone()
        next_ids[rows_t] = torch.from_numpy(token_ids_cpu[np.flatnonzero(partial), ends]).to(
            device=device, dtype=next_ids.dtype
        )
        seq_lens = cad.seq_lens.clone()
        # The query ends before the new token: a draft model's pass adds its slot (and one to seq_lens).
        seq_lens[rows_t] = torch.from_numpy(ends).to(device=device, dtype=seq_lens.dtype)
        kwargs["next_token_ids"] = next_ids
        changes["seq_lens"] = seq_lens
        if kwargs.get("num_rejected_tokens_gpu") is not None:
            rejected = kwargs["num_rejected_tokens_gpu"].clone()
            rejected[rows_t] = 0
            kwargs["num_rejected_tokens_gpu"] = rejected
    if kwargs.get("token_indices_to_sample") is not None:  # EAGLE's: each query's last accepted token
        last = torch.from_numpy(new_start[1:] - 1).to(device)
        rejected = kwargs.get("num_rejected_tokens_gpu")
        indices = last if rejected is None else last - rejected.to(last.dtype)
        kwargs["token_indices_to_sample"] = indices.to(kwargs["token_indices_to_sample"].dtype)
    kwargs["common_attn_metadata"] = cad.replace(**changes)
    return kwargs
