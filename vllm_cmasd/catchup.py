"""Skipping the drafter, and catching its KV cache up afterwards.

vLLM runs the drafter's first pass on every step, also when nothing is
drafted, to write the drafter's KV cache for the tokens the target just
verified. CM-ASD skips the drafter on a step where drafting does not pay; the
requests of that step then *lag*: the drafter's KV cache is valid only below
their lag start ``F`` (a position). The next step that drafts for a request
first runs its missed tokens ``F .. num_computed - 1`` in the same first pass:
they are prepended to the request's query (token ids from the request's
committed tokens, consecutive positions; the slot mapping follows from the
block table inside vLLM's first pass), a prefill-like pass.

Where the KV cache could hold drafter garbage:

* a request first seen with computed tokens (a prefix-cache hit) after any
  step skipped the drafter, or on a step that skips it: its cached blocks may
  have been filled on a skipped step, so it lags from position 0;
* a request whose computed tokens went backwards (preempted, then resumed
  with recompute): the same, once any step skipped; otherwise nothing lags;
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


class DrafterLag:
    """Per request, where the drafter's valid KV cache ends (only for those that lag)."""

    def __init__(self, max_tracked: int):
        self.lag_start: dict[str, int] = {}
        self._last_computed: dict[str, int] = {}
        self._max_tracked = max_tracked
        self._cache_hits_now: set[str] = set()
        self.skipped_any = False
        self.num_catch_up_tokens = 0
        self.num_split_passes = 0  # partial catch-ups run
        self.num_restarts = 0  # requests set to lag from 0 (cache hit or recompute after a skip)

    def observe(self, req_ids: list[str], num_computed: np.ndarray) -> None:
        """Before a step: find requests whose cached or recomputed KV may be drafter garbage."""
        self._cache_hits_now = set()
        for req_id, computed in zip(req_ids, num_computed.tolist()):
            last = self._last_computed.get(req_id)
            fresh_with_cache = last is None and computed > 0
            recomputed = last is not None and computed < last
            if fresh_with_cache:
                self._cache_hits_now.add(req_id)
            if (fresh_with_cache or recomputed) and self.skipped_any:
                self.lag_start[req_id] = 0
                self.num_restarts += 1
            elif recomputed:
                self.lag_start.pop(req_id, None)
            self._last_computed[req_id] = computed
        # Finished requests are never announced to the proposer: forget the oldest.
        while len(self._last_computed) > self._max_tracked:
            oldest = next(iter(self._last_computed))
            self._last_computed.pop(oldest)
            self.lag_start.pop(oldest, None)

    def skip(self, req_ids: list[str], num_computed: np.ndarray) -> None:
        """This step runs no drafter pass: every request lags from where it is now."""
        self.skipped_any = True
        for req_id, computed in zip(req_ids, num_computed.tolist()):
            # A cache hit in this very step may be on blocks another request of
            # this step is filling now, without the drafter: lag from 0.
            if req_id in self._cache_hits_now and req_id not in self.lag_start:
                self.num_restarts += 1
            self.lag_start.setdefault(req_id, 0 if req_id in self._cache_hits_now else computed)

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

    def ran(self, req_ids: list[str], plan: CatchUpPlan) -> None:
        """A first pass ran: requests that caught up (or never lagged) are current."""
        for i, req_id in enumerate(req_ids):
            if plan.partial[i]:  # ran start .. start + missed, the last as its new token
                self.lag_start[req_id] = int(plan.start[i] + plan.missed[i] + 1)
                self.num_split_passes += 1
            elif not plan.blocked[i]:
                self.lag_start.pop(req_id, None)
        self.num_catch_up_tokens += plan.num_tokens


def with_catch_up(kwargs: dict, plan: CatchUpPlan, token_ids_cpu: np.ndarray) -> dict:
    """``propose`` keyword arguments whose first pass runs the plan's catch-ups.

    The first pass reads each request's first position and takes the rest as
    consecutive, and computes the slot mapping from positions and the block
    table; so a catch-up needs only token ids, positions and a longer (or, for
    a partial one, another) query. Rejected tokens stay at the end of each
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

    ids = torch.empty(total, dtype=old_ids.dtype, device=device)
    positions = torch.empty(total, dtype=old_pos.dtype, device=device)
    kept_t, kept_dest_t = torch.from_numpy(kept).to(device), torch.from_numpy(kept_dest).to(device)
    ids[kept_dest_t] = old_ids[kept_t]
    positions[kept_dest_t] = old_pos[kept_t]
    cu_dest_t = torch.from_numpy(cu_dest).to(device)
    ids[cu_dest_t] = torch.from_numpy(cu_ids).to(device=device, dtype=ids.dtype)
    positions[cu_dest_t] = torch.from_numpy(cu_pos).to(device=device, dtype=positions.dtype)

    new_start_cpu = torch.from_numpy(new_start.astype(np.int32))
    changes = dict(
        query_start_loc=new_start_cpu.to(device),
        query_start_loc_cpu=new_start_cpu,
        num_actual_tokens=total,
        max_query_len=int(new_lens.max()),
        positions=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    kwargs = dict(kwargs, target_token_ids=ids, target_positions=positions)
    if partial.any():
        rows_t = torch.from_numpy(np.flatnonzero(partial)).to(device)
        ends = plan.start[partial] + plan.missed[partial]  # the new token's position
        next_ids = kwargs["next_token_ids"].clone()
        next_ids[rows_t] = torch.from_numpy(token_ids_cpu[np.flatnonzero(partial), ends]).to(
            device=device, dtype=next_ids.dtype
        )
        seq_lens = cad.seq_lens.clone()
        seq_lens[rows_t] = torch.from_numpy(ends + 1).to(device=device, dtype=seq_lens.dtype)
        kwargs["next_token_ids"] = next_ids
        changes["seq_lens"] = seq_lens
        if kwargs.get("num_rejected_tokens_gpu") is not None:
            rejected = kwargs["num_rejected_tokens_gpu"].clone()
            rejected[rows_t] = 0
            kwargs["num_rejected_tokens_gpu"] = rejected
    kwargs["common_attn_metadata"] = cad.replace(**changes)
    return kwargs
