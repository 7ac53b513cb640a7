"""Fair share across callers: whose job heads the next batch when several callers have jobs queued.

Weighted round-robin by stride scheduling, inside the top priority: each caller (`owner`: an API key, a user,
an address) has a `pass`, the work it has been given divided by its weight (keys file). The next batch is
built around the oldest job of the caller with the lowest pass; the batch is then filled with compatible jobs
of any caller (batcher.select), and every job in it charges its own caller. So one caller with 500 jobs queued
cannot make another's single job wait behind them: the other's pass is lower, and its job heads the next batch.

The virtual time `vt` is the pass of the caller last served. A caller that was idle comes back at `vt`, not at
the lower pass it had: waiting earns no credit to spend in a burst later.

Each backend keeps the passes (SQLite: in memory; Redis: a hash) and picks with `pick`. The charge is `charge`
here for SQLite, and the same arithmetic inside the Redis claim script (Lua: the charge must be atomic with the
claim); test_fairshare runs the same cases through both backends.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence


def pick(owners: Sequence[str], passes: Mapping[str, float], vt: float) -> tuple[str, float]:
    """The caller whose oldest job runs next, and the new virtual time. `owners`: the callers with jobs at the
    top priority, ordered by their oldest job's arrival (ties go to the earliest)."""
    effective = {owner: max(passes.get(owner, vt), vt) for owner in owners}
    owner = min(owners, key=effective.__getitem__)
    return owner, effective[owner]


def charge(passes: MutableMapping[str, float], vt: float, owner: str, work: float, weight: float) -> None:
    """A job of `work` (steps x images) of this caller was claimed."""
    passes[owner] = max(passes.get(owner, vt), vt) + work / max(weight, 1e-9)
