"""The Redis store's indexes: hints per filter, sharded, verified against the run when read.

Every index entry is a hint. It is written before the commit it describes (so a crash in
between leaves an entry too many, never one too few) and checked against the run when read.
A stale entry is removed only through `UNHINT`, which refuses while the run's latest hint is
newer than the version the reader saw: a reader can never remove the entry of a commit that
is still on its way. Commits that succeed remove the entries they made stale at once, so the
indexes stay exact in the common case and a listing costs the page plus the few stale
entries it meets.

Each index is split over `SHARDS` sorted sets (one per `{idx-N}` tag, by the run's shard) and
read newest first with a bounded k-way merge: a page of `limit` after `offset` reads about
twice each shard's share of `offset + limit` entries (more only from a shard that holds more
than its share), never the whole index.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from statemachine import lua
from statemachine.keys import (
    SHARDS,
    Keys,
    approval_member,
    shard_of,
    split_approval_member,
)
from statemachine.states import RunState
from statemachine.store import (
    Approval,
    ApprovalQuery,
    Commit,
    RunQuery,
    StoredRun,
    approval_matches,
    dumps,
    run_matches,
)

log = logging.getLogger(__name__)

APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired")
ORPHAN_SECONDS = 3600.0
"""A hint whose run does not exist and whose score is older than this is removed: no create
stays in flight that long, so it is the hint of a create that never happened."""
FORCE = 10**15
"""A version above any run's: UNHINT with it removes unconditionally."""
_MAX_WINDOW = 1000
_PURGE_PER_SHARD = 64
_ALL_SHARDS = range(SHARDS)


@dataclass(order=False)
class _Entry:
    """One index entry in the merge; the heap pops the newest (score, member) first, or the
    oldest when the merge is ascending."""

    score: float
    member: str
    key: str = field(compare=False)
    descending: bool = field(default=True, compare=False)

    def __lt__(self, other: _Entry) -> bool:
        if self.descending:
            return (self.score, self.member) > (other.score, other.member)
        return (self.score, self.member) < (other.score, other.member)


class Merge:
    """Several sorted sets read as one sequence (newest first unless `descending` is False),
    a bounded window of each at a time."""

    def __init__(self, client: Any, keys: list[str], window: int,
                 descending: bool = True) -> None:
        self.client = client
        self.descending = descending
        # `window` entries in all are wanted; the shards share them about evenly (a stable
        # hash), so each is read for twice its share first, and a shard that runs out is
        # read further (doubling) without touching the others.
        share = window if len(keys) <= 1 else 2 * window // len(keys) + 8
        self.window = max(1, min(share, window, _MAX_WINDOW))
        self.heap: list[_Entry] = []
        self.start: dict[str, int] = dict.fromkeys(keys, 0)
        self.buffers: dict[str, deque] = {}
        self.done: set[str] = set()
        self._fill(keys)

    def _fill(self, keys: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            start = self.start[key]
            read = pipe.zrevrange if self.descending else pipe.zrange
            read(key, start, start + self.window - 1, withscores=True)
        for key, rows in zip(keys, pipe.execute(), strict=True):
            self.start[key] += len(rows)
            if len(rows) < self.window:
                self.done.add(key)
            self.buffers[key] = deque(rows)
            self._push(key)
        self.window = min(self.window * 2, _MAX_WINDOW)

    def _push(self, key: str) -> None:
        buffer = self.buffers[key]
        if buffer:
            member, score = buffer.popleft()
            heapq.heappush(self.heap, _Entry(float(score), member, key, self.descending))
        elif key not in self.done:
            self._fill([key])

    def take(self, count: int) -> list[_Entry]:
        """The next `count` entries in merged order (fewer when all sets are exhausted)."""
        out: list[_Entry] = []
        while self.heap and len(out) < count:
            entry = heapq.heappop(self.heap)
            out.append(entry)
            self._push(entry.key)
        return out


class _Hint:
    """The arguments of one HINT call: sorted-set entries of one run, in its shard."""

    def __init__(self, keys: Keys, run_id: str, version: int, identity: str = "") -> None:
        self.shard = shard_of(run_id)
        self.keys = [keys.run_hinted(self.shard), keys.run_identity(self.shard)]
        self.args: list[Any] = [run_id, version, identity]

    def add(self, key: str, member: str, score: float | None = None,
            same_as: str | None = None) -> None:
        """Add `member` to `key` at `score`, or at the score it has in `same_as` (a key
        already added, or `key` itself), or nowhere if it has none there."""
        self.keys.append(key)
        self.args += [repr(score) if same_as is None else f"@{self.keys.index(same_as) + 1}",
                      member]

    def send(self, pipe: Any) -> None:
        pipe_eval(pipe, lua.HINT, self.keys, self.args)

    def run(self, client: Any) -> None:
        client.execute_command("EVAL", lua.HINT, len(self.keys), *self.keys, *self.args)

    def entries(self) -> list[list[str]]:
        """The sorted-set entries as [key, score, member, key whose score to take] ('' for
        none), for a script that applies them itself (see `RedisIndex.inline`)."""
        rows = []
        for i, key in enumerate(self.keys[2:]):
            score, member = self.args[3 + 2 * i], self.args[4 + 2 * i]
            if score.startswith("@"):
                rows.append([key, "", member, self.keys[int(score[1:]) - 1]])
            else:
                rows.append([key, score, member, ""])
        return rows


def pipe_eval(pipe: Any, source: str, keys: list[str], args: list[Any]) -> None:
    """Queue EVAL of `source` (sent whole: no NOSCRIPT can fail a pipeline) on `pipe`; the
    cluster pipeline routes it by its keys, which must share one slot."""
    pipe.execute_command("EVAL", source, len(keys), *keys, *args)


def _identity(run: StoredRun) -> str:
    return dumps({"agent_id": run.agent_id, "session_id": run.session_id,
                  "user_id": run.user_id})


def _sum(values: Iterable[Any]) -> int:
    return sum(int(v or 0) for v in values)


class RedisIndex:
    """Writes, verifies, merges and purges the index hints of a `RedisRunStore`."""

    def __init__(self, client: Any, keys: Keys,
                 read_run: Callable[[dict[str, str], str | None], StoredRun],
                 read_approval: Callable[[dict[str, str]], Approval]) -> None:
        self.redis = client
        self.keys = keys
        self._run = read_run
        self._approval = read_approval

    # -- writing hints --------------------------------------------------------------------

    def hint_create(self, run: StoredRun, pipe: Any = None) -> None:
        """Every entry a new run needs, at version 1, before the run exists (queued on
        `pipe` when given, ahead of the create it describes)."""
        self._hint_run(run, 1, None, pipe)

    def hint_stored_run(self, run: StoredRun, finished_at: float | None) -> None:
        """The entries of a run that exists already (a rebuild), at its own version."""
        self._hint_run(run, run.version, finished_at)

    def _hint_run(self, run: StoredRun, version: int, finished_at: float | None,
                  pipe: Any = None) -> None:
        hint = self._run_hint(run, version, finished_at)
        if pipe is None:
            hint.run(self.redis)
        else:
            hint.send(pipe)

    def _run_hint(self, run: StoredRun, version: int, finished_at: float | None) -> _Hint:
        k, s = self.keys, shard_of(run.run_id)
        hint = _Hint(k, run.run_id, version, _identity(run))
        for key in self._identity_keys(s, run.agent_id, run.session_id, run.user_id):
            hint.add(key, run.run_id, run.created_at)
        hint.add(k.agent_state_runs(s, run.agent_id, run.state.value), run.run_id,
                 run.created_at)
        self._lifecycle(hint, run.run_id, run.lease_until, run.paused_at, finished_at)
        return hint

    def inline_create(self, run: StoredRun) -> str:
        """A new run's index entries as the JSON its CREATE applies (see `inline`); a create
        that finds the run existing writes none, so a duplicate moves nothing."""
        hint = self._run_hint(run, 1, None)
        return dumps({"h": hint.keys[0], "run": run.run_id, "v": 1,
                      "id": [hint.keys[1], hint.args[2]], "z": hint.entries(), "s": [],
                      "r": []})

    def hint_stored_approval(self, approval: Approval, created_at: float) -> None:
        """The entries of an approval that exists already (a rebuild)."""
        member = approval_member(approval.approval_id, approval.run_id)
        hint = _Hint(self.keys, approval.run_id, 0)
        for key in self._approval_keys(hint.shard, approval.run_id, approval.doc,
                                       (approval.status,)):
            hint.add(key, member, created_at)
        hint.run(self.redis)
        self.redis.hset(self.keys.approval_runs(approval.approval_id), approval.approval_id,
                        approval.run_id)

    def hint_commit(self, commit: Commit) -> None:
        """The entries `commit` will make true: its state, lifecycle and new approvals."""
        hint, owners = self._commit_hint(commit)
        pipe = self.redis.pipeline(transaction=False)
        for key, approval_id, run_id in owners:
            pipe.hset(key, approval_id, run_id)
        hint.send(pipe)
        pipe.execute()

    def inline(self, commit: Commit, extra: list[list[str]]) -> str:
        """Every index write of `commit` (its hints, then what it makes stale) as the JSON
        that COMMIT applies in its own atomic step: on a single Redis server all keys are
        reachable from one script, so a commit costs one round trip and its indexes are
        exact at once. `extra` are more [key, score, member] entries (the outbox shard)."""
        hint, owners = self._commit_hint(commit)
        entries = [*hint.entries(), *([key, score, member, ""] for key, score, member in extra)]
        removals = [[key, member] for keys, member in self._made_stale(commit)
                    for key in keys]
        return dumps({"h": hint.keys[0], "run": commit.run_id,
                      "v": commit.expected_version + 1, "z": entries,
                      "s": [list(owner) for owner in owners], "r": removals})

    def _commit_hint(self, commit: Commit) -> tuple[_Hint, list[tuple[str, str, str]]]:
        """The HINT of `commit`, and the approval-to-run entries of its new approvals."""
        k, rid = self.keys, commit.run_id
        s, agent = shard_of(rid), self._agent_of(commit)
        hint = _Hint(k, rid, commit.expected_version + 1)
        base = k.agent_runs(s, agent)
        hint.add(base, rid, same_as=base)
        hint.add(k.agent_state_runs(s, agent, commit.state.value), rid, same_as=base)
        retained = commit.now if commit.retain_seconds is not None else None
        self._lifecycle(hint, rid, commit.lease_until, commit.paused_at, retained)
        owners = []
        for approval in commit.approvals:
            self._hint_new_approval(hint, approval, commit.now)
            owners.append((k.approval_runs(approval.approval_id), approval.approval_id, rid))
        for approval_id in commit.expire_approvals:
            self._hint_status(hint, approval_member(approval_id, rid), "expired")
        return hint, owners

    def hint_resolve(self, approval: Approval, expected_version: int) -> None:
        """The status entry a resolve will make true."""
        hint = _Hint(self.keys, approval.run_id, expected_version + 1)
        self._hint_status(hint, approval_member(approval.approval_id, approval.run_id),
                          approval.status)
        hint.run(self.redis)

    def _agent_of(self, commit: Commit) -> str:
        agent = commit.agent_id or (commit.doc or {}).get("agent_id")
        if isinstance(agent, str):
            return agent
        raw = self.redis.hget(self.keys.run_identity(shard_of(commit.run_id)), commit.run_id)
        return json.loads(raw)["agent_id"] if raw else ""

    def _identity_keys(self, s: int, agent: str, session: str, user: str | None) -> list[str]:
        k = self.keys
        keys = [k.agent_runs(s, agent), k.agent_session_runs(s, agent, session)]
        if user:
            keys.append(k.agent_user_runs(s, agent, user))
        return keys

    def _lifecycle(self, hint: _Hint, run_id: str, lease_until: float | None,
                   paused_at: float | None, finished_at: float | None) -> None:
        k, s = self.keys, hint.shard
        for key, score in ((k.executing(s), lease_until), (k.paused(s), paused_at),
                           (k.finished(s), finished_at)):
            if score is not None:
                hint.add(key, run_id, score)

    def _hint_new_approval(self, hint: _Hint, approval: Approval, now: float) -> None:
        member = approval_member(approval.approval_id, approval.run_id)
        for key in self._approval_keys(hint.shard, approval.run_id, approval.doc,
                                       ("pending",)):
            hint.add(key, member, now)

    def _hint_status(self, hint: _Hint, member: str, status: str) -> None:
        base = self.keys.approvals(hint.shard)
        hint.add(base, member, same_as=base)
        hint.add(self.keys.approvals_by(hint.shard, "status", status), member, same_as=base)

    def _approval_keys(self, s: int, run_id: str, who: dict[str, Any],
                       statuses: Iterable[str]) -> list[str]:
        """Every approvals index of shard `s` an approval of `run_id` (whose agent, user and
        session `who` names) is in, under each of `statuses`."""
        k = self.keys
        keys = [k.approvals(s), k.run_approvals(run_id)]
        keys += [k.approvals_by(s, "status", status) for status in statuses]
        for name, value in (("agent", who.get("agent_id")), ("user", who.get("user_id")),
                            ("session", who.get("session_id"))):
            if isinstance(value, str) and value:
                keys.append(k.approvals_by(s, name, value))
        return keys

    # -- removing what a successful write made stale --------------------------------------

    def after_commit(self, commit: Commit, version: int) -> None:
        """Drop the entries `commit` (now at `version`) made stale; failures only log."""
        removals = self._made_stale(commit)
        self._quietly(lambda: self._unhint(commit.run_id, version, removals))

    def _made_stale(self, commit: Commit) -> list[tuple[list[str], str]]:
        """The (index keys, member) entries that `commit`, once applied, makes stale."""
        k, rid = self.keys, commit.run_id
        s, agent = shard_of(rid), self._agent_of(commit)
        stale = [k.agent_state_runs(s, agent, state.value) for state in RunState
                 if state is not commit.state]
        if commit.lease_until is None:
            stale.append(k.executing(s))
        if commit.paused_at is None:
            stale.append(k.paused(s))
        removals = [(stale, rid)]
        pending = k.approvals_by(s, "status", "pending")
        removals += [([pending], approval_member(a, rid)) for a in commit.expire_approvals]
        return removals

    def after_lost_commit(self, commit: Commit) -> None:
        """A commit that lost its compare-and-set created none of its approvals: their ids
        are its own, so their hints go at once (counts stay exact); failures only log."""
        if not commit.approvals:
            return

        def forget() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for approval in commit.approvals:
                member = approval_member(approval.approval_id, commit.run_id)
                self.forget_approval(pipe, member, approval.doc)
            pipe.execute()

        self._quietly(forget)

    def after_resolve(self, approval: Approval, version: int) -> None:
        """Drop the resolved approval's pending entry; failures only log."""
        s = shard_of(approval.run_id)
        member = approval_member(approval.approval_id, approval.run_id)
        pending = self.keys.approvals_by(s, "status", "pending")
        self._quietly(lambda: self._unhint(approval.run_id, version, [([pending], member)]))

    def _unhint(self, run_id: str, version: int,
                removals: list[tuple[list[str], str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for keys, member in removals:
            self._send_unhint(pipe, run_id, version, keys, member)
        pipe.execute()

    def _send_unhint(self, pipe: Any, run_id: str, version: int, keys: list[str],
                     member: str) -> None:
        hinted = self.keys.run_hinted(shard_of(run_id))
        pipe_eval(pipe, lua.UNHINT, [hinted, *keys], [run_id, version, member])

    @staticmethod
    def _quietly(step: Callable[[], None]) -> None:
        """Clean-up after a write that succeeded must not turn it into a failure."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a stale hint is harmless; the write stands
            log.warning("index clean-up skipped (the next reader does it): %s", exc)

    # -- reading runs ---------------------------------------------------------------------

    def list_runs(self, query: RunQuery) -> list[StoredRun]:
        """A page of the agent's runs, newest first, from the most selective index."""
        sources = self._run_sources(query)
        window = query.offset + query.limit
        merge = Merge(self.redis, list(sources), window)
        return self._page(merge, query.offset, query.limit,
                          lambda batch: self._verify_runs(batch, sources, query))

    def _run_sources(self, query: RunQuery) -> dict[str, str | None]:
        """Source key -> the state it stands for (None: an index that never goes stale)."""
        k, agent = self.keys, query.agent_id
        groups: list[dict[str, str | None]] = []
        if query.session_id is not None:
            groups.append({k.agent_session_runs(s, agent, query.session_id): None
                           for s in _ALL_SHARDS})
        if query.user_id is not None:
            groups.append({k.agent_user_runs(s, agent, query.user_id): None
                           for s in _ALL_SHARDS})
        if query.states is not None:
            groups.append({k.agent_state_runs(s, agent, state.value): state.value
                           for s in _ALL_SHARDS for state in sorted(query.states)})
        if not groups:
            return {k.agent_runs(s, agent): None for s in _ALL_SHARDS}
        return self._smallest(groups)

    def _smallest(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        if len(groups) == 1:
            return groups[0]
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            for key in group:
                pipe.zcard(key)
        cards, sizes = iter(pipe.execute()), []
        for group in groups:
            sizes.append(sum(next(cards) for _ in group))
        return groups[sizes.index(min(sizes))]

    @staticmethod
    def _page(merge: Merge, offset: int, limit: int,
              verify: Callable[[list[_Entry]], list[Any]]) -> list[Any]:
        page: list[Any] = []
        skipped = 0
        while len(page) < limit:
            batch = merge.take(limit - len(page) + offset - skipped)
            if not batch:
                break
            for item in verify(batch):
                if skipped < offset:
                    skipped += 1
                elif len(page) < limit:
                    page.append(item)
        return page

    def _verify_runs(self, batch: list[_Entry], sources: dict[str, str | None],
                     query: RunQuery) -> list[StoredRun]:
        pipe = self.redis.pipeline(transaction=False)
        for entry in batch:
            pipe.hgetall(self.keys.run(entry.member))
            pipe.get(self.keys.doc(entry.member))
        found, removals = [], self.redis.pipeline(transaction=False)
        answers = pipe.execute()
        for entry, fields, doc in zip(batch, answers[::2], answers[1::2], strict=True):
            run = self._run(fields, doc) if fields else None
            seen = self._seen_version(run, entry)
            state = sources[entry.key]
            if run is None or (state is not None and run.state.value != state):
                if seen is not None:
                    self._send_unhint(removals, entry.member, seen, [entry.key], entry.member)
                continue
            if run_matches(run, query):
                found.append(run)
        removals.execute()
        return found

    @staticmethod
    def _seen_version(run: StoredRun | None, entry: _Entry) -> int | None:
        """The version to remove a stale entry at: the run's, FORCE for an old orphan, or
        None (keep) for the hint of a run that may still be being created."""
        if run is not None:
            return run.version
        return FORCE if entry.score < time.time() - ORPHAN_SECONDS else None

    # -- reading approvals ----------------------------------------------------------------

    def list_approvals(self, query: ApprovalQuery) -> tuple[list[Approval], int]:
        """A page of approvals, newest first, and the number that match: the indexes' count
        less the stale entries this page met (exact unless a crash left a hint behind)."""
        groups = self._approval_groups(query)
        total = self._approval_total(query, groups)
        sources = self._smallest(groups) if groups else {
            self.keys.approvals(s): None for s in _ALL_SHARDS}
        merge = Merge(self.redis, list(sources), query.offset + query.limit)
        stale: list[int] = []
        page = self._page(merge, query.offset, query.limit,
                          lambda batch: self._verify_approvals(batch, sources, query, stale))
        exact = len(groups) <= 1  # the total counted the very entries found stale
        return page, max(0, total - len(stale)) if exact else total

    def count_pending(self, user_id: str | None) -> int:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for s in _ALL_SHARDS:
            pending = k.approvals_by(s, "status", "pending")
            if user_id is None:
                pipe.zcard(pending)
            else:
                pipe.zintercard(2, [pending, k.approvals_by(s, "user", user_id)])
        return _sum(pipe.execute())

    def _approval_groups(self, query: ApprovalQuery) -> list[dict[str, str | None]]:
        """One group of source keys per filter; a status group's keys go stale."""
        k, groups = self.keys, []
        if query.run_id is not None:
            groups.append({k.run_approvals(query.run_id): None})
        if query.status is not None:
            groups.append({k.approvals_by(s, "status", query.status): query.status
                           for s in _ALL_SHARDS})
        for name, value in (("agent", query.agent_id), ("user", query.user_id),
                            ("session", query.session_id)):
            if value is not None:
                groups.append({k.approvals_by(s, name, value): None for s in _ALL_SHARDS})
        return groups

    def _approval_total(self, query: ApprovalQuery, groups: list[dict[str, Any]]) -> int:
        """ZCARD of the one index, or ZINTERCARD per shard of several (same slot each)."""
        pipe = self.redis.pipeline(transaction=False)
        if not groups:
            for s in _ALL_SHARDS:
                pipe.zcard(self.keys.approvals(s))
        elif len(groups) == 1:
            for key in groups[0]:
                pipe.zcard(key)
        else:
            self._intercards(pipe, query, groups)
        return _sum(pipe.execute())

    def _intercards(self, pipe: Any, query: ApprovalQuery,
                    groups: list[dict[str, Any]]) -> None:
        shards = [shard_of(query.run_id)] if query.run_id is not None else list(_ALL_SHARDS)
        for s in shards:
            tag = f"{{idx-{s}}}"
            keys = [key for group in groups for key in group if tag in key]
            pipe.zintercard(len(keys), keys)

    def _verify_approvals(self, batch: list[_Entry], sources: dict[str, str | None],
                          query: ApprovalQuery, stale: list[int]) -> list[Approval]:
        pipe = self.redis.pipeline(transaction=False)
        for entry in batch:
            approval_id, run_id = split_approval_member(entry.member)
            pipe.hget(self.keys.run(run_id), "version")
            pipe.hgetall(self.keys.approval(run_id, approval_id))
        replies = iter(pipe.execute())
        found, removals = [], self.redis.pipeline(transaction=False)
        for entry in batch:
            version, fields = next(replies), next(replies)
            approval = self._approval(fields) if fields else None
            status = sources[entry.key]
            if approval is None or (status is not None and approval.status != status):
                seen = int(version) if version else (
                    FORCE if entry.score < time.time() - ORPHAN_SECONDS else None)
                if seen is not None:
                    run_id = split_approval_member(entry.member)[1]
                    self._send_unhint(removals, run_id, seen, [entry.key], entry.member)
                stale.append(1)
                continue
            if approval_matches(approval, query):
                found.append(approval)
        removals.execute()
        return found

    # -- sweeps ---------------------------------------------------------------------------

    def due(self, kind: str, bound: float, limit: int,
            still: Callable[[StoredRun, float], bool]) -> list[str]:
        """Up to `limit` runs of the `executing` or `paused` index scored at most `bound`,
        oldest first, that `still` confirms; stale entries met on the way are removed."""
        index = getattr(self.keys, kind)
        pipe = self.redis.pipeline(transaction=False)
        for s in _ALL_SHARDS:
            pipe.zrangebyscore(index(s), "-inf", bound, start=0, num=limit, withscores=True)
        entries = sorted((float(score), member, index(shard_of(member)))
                         for rows in pipe.execute() for member, score in rows)[:limit]
        pipe = self.redis.pipeline(transaction=False)
        for _, member, _ in entries:
            pipe.hgetall(self.keys.run(member))
        due, removals = [], self.redis.pipeline(transaction=False)
        for (score, member, key), fields in zip(entries, pipe.execute(), strict=True):
            run = self._run(fields, None) if fields else None
            if run is not None and still(run, bound):
                due.append(member)
                continue
            seen = self._seen_version(run, _Entry(score, member, key))
            if seen is not None:
                self._send_unhint(removals, member, seen, [key], member)
        removals.execute()
        return due

    def renew(self, run_ids: list[str], until: float, pipe: Any) -> None:
        """Move the lease hints of `run_ids` to `until` (a renewal bumps no version)."""
        by_shard: dict[int, list[str]] = {}
        for run_id in run_ids:
            by_shard.setdefault(shard_of(run_id), []).append(run_id)
        for s, ids in by_shard.items():
            pipe.zadd(self.keys.executing(s), dict.fromkeys(ids, until))

    # -- retention ------------------------------------------------------------------------

    def purge(self, before: float) -> int:
        """Remove every index entry of runs finished before `before`, whether their own keys
        still exist or the TTL already took them: the run's identity and approvals are kept
        in its shard for this. Bounded: at most `_PURGE_PER_SHARD` runs per shard a call."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for s in _ALL_SHARDS:
            pipe.zrangebyscore(k.finished(s), "-inf", before, start=0, num=_PURGE_PER_SHARD)
        ids = [run_id for rows in pipe.execute() for run_id in rows]
        if not ids:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            s = shard_of(run_id)
            pipe.hget(k.run(run_id), "state")
            pipe.hget(k.run_identity(s), run_id)
            pipe.zrange(k.run_approvals(run_id), 0, -1)
        replies, purged = iter(pipe.execute()), 0
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            state, identity, approvals = next(replies), next(replies), next(replies)
            pipe.zrem(k.finished(shard_of(run_id)), run_id)
            if state and not RunState(state).is_final:
                continue  # the hint of a final commit that lost its compare-and-set
            self._forget_run(pipe, run_id, json.loads(identity) if identity else {}, approvals)
            purged += 1
        pipe.execute()
        return purged

    def deleted(self, run_id: str, expired: list[str], now: float) -> None:
        """A run deleted (with its session): it leaves every run listing now; its approvals
        stay readable, `expired` ones under that status, until retention purges the run's
        remaining entries as for any finished run (scored `now` in `finished`)."""
        k, s = self.keys, shard_of(run_id)
        hint = _Hint(k, run_id, 0)
        hint.add(k.finished(s), run_id, now)
        for approval_id in expired:
            self._hint_status(hint, approval_member(approval_id, run_id), "expired")
        hint.run(self.redis)
        who = self.identity(run_id)
        keys = [k.executing(s), k.paused(s)]
        agent = who.get("agent_id")
        if isinstance(agent, str):
            keys += self._identity_keys(s, agent, who.get("session_id") or "",
                                        who.get("user_id"))
            keys += [k.agent_state_runs(s, agent, state.value) for state in RunState]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zrem(key, run_id)
        pending = k.approvals_by(s, "status", "pending")
        for approval_id in expired:
            pipe.zrem(pending, approval_member(approval_id, run_id))
        pipe.execute()

    def _forget_run(self, pipe: Any, run_id: str, who: dict[str, Any],
                    approvals: list[str]) -> None:
        k, s = self.keys, shard_of(run_id)
        agent = who.get("agent_id")
        keys = [k.executing(s), k.paused(s)]
        if isinstance(agent, str):
            keys += self._identity_keys(s, agent, who.get("session_id") or "",
                                        who.get("user_id"))
            keys += [k.agent_state_runs(s, agent, state.value) for state in RunState]
        for key in keys:
            pipe.zrem(key, run_id)
        for member in approvals:
            self.forget_approval(pipe, member, who)
        pipe.delete(k.run_approvals(run_id))
        pipe.hdel(k.run_identity(s), run_id)
        pipe.hdel(k.run_hinted(s), run_id)

    def forget_approval(self, pipe: Any, member: str, who: dict[str, Any]) -> None:
        """Remove one approval from every index (it is deleted or its run purged)."""
        approval_id, run_id = split_approval_member(member)
        for key in self._approval_keys(shard_of(run_id), run_id, who, APPROVAL_STATUSES):
            pipe.zrem(key, member)
        pipe.hdel(self.keys.approval_runs(approval_id), approval_id)

    def identity(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self.keys.run_identity(shard_of(run_id)), run_id)
        return json.loads(raw) if raw else {}

