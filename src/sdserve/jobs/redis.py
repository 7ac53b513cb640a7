"""The job queue and job store on Redis, shared by every process that names the same `--queue redis://…`.

Why sorted sets and Lua rather than a stream with a consumer group: dynamic batching claims the head of the
queue *and* later jobs of the head's shape, in priority order. A stream delivers strictly in order to each
consumer and cannot hand out chosen entries, so claims are a Lua script over a sorted set (score = priority,
then arrival), atomic across workers.

Keys (after the prefix, `sdserve:` unless SDSERVE_QUEUE_PREFIX says otherwise): `job:{id}` a hash per job;
`queued` (score: priority then sequence), `running` (score: lease expiry), `deadlines`, `all` and `owned:{owner}` (score: sequence,
for listing everyone's and one caller's), `finished` (score: end time, for retention) sorted sets; `oq:{owner}`, `owners`, `fair`, `fair:vt` for fair share across callers; `idem:{key}`; `events:{id}` a stream per job (replayable after an event id, kept a
day); `wake` a list claimers block on.

The autoscaler's signal: `demand`, a stream with the consumer group `workers`, whose lag (XINFO GROUPS, what
KEDA's `redis-streams` scaler reads with `lagCount`; it needs Redis 7) equals the number of queued jobs. A
submit or a requeue adds an entry; a claim, or the end of a job that was still queued, reads one through the
group and deletes it (XACK + XDEL of delivered entries only: deleting an undelivered one would make the lag
unknown). The scripts keep the two in step; `ensure_demand` creates the stream and group (and seeds it with the
queued jobs) when they are missing, at start and on every readiness check, so KEDA can scale from zero.

At least once, with leases: a claim gives a lease of `lease_s`; the runner heartbeats it while it works. A
lease that runs out (the worker died) puts the job back in the queue, up to MAX_ATTEMPTS deliveries, then
it fails with the reason. A job's end is recorded once (the finish script ignores a job already ended).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sdserve import webhooks
from sdserve.jobs import fairshare, policy
from sdserve.jobs.events import Event, Preview, job_event, preview_event, progress_event
from sdserve.jobs.queue import (
    MAX_ATTEMPTS,
    IdempotencyConflict,
    JobEnds,
    JobFinished,
    JobNotFound,
    NotAccepting,
    QueueFull,
    Selector,
    Stops,
    StorageError,
)
from sdserve.schema import FINAL_STATUSES, ImageRef, Job, JobRequest, JobStatus

PREFIX = "sdserve:"  # the default; SDSERVE_QUEUE_PREFIX keeps deployments sharing a Redis apart
EVENTS_TTL_S = 86400

# Higher priority first, then arrival: priority is -100..100 and sequence numbers stay far below 1e12.
_SCORE = "(100 - tonumber(priority)) * 1e12 + tonumber(seq)"

DEMAND = "demand"  # the stream's key after the prefix (the scripts below use it too): KEDA's trigger names it
DEMAND_GROUP = "workers"
# How often recovery (every replica's reaper) checks that the stream and group exist: a Redis that restarted
# empty (no AOF) gets them back within this long, so KEDA keeps its trigger.
DEMAND_CHECK_S = 2.0

# Lua: take n entries off the demand stream (each one a queued job that left the queue). pcall: a missing group
# (Redis lost its data) must not stop jobs; ensure_demand restores it.
_CONSUME = f"""
local function consume(p, n)
  if n < 1 then return end
  local got = redis.pcall('XREADGROUP', 'GROUP', '{DEMAND_GROUP}', 'sdserve', 'COUNT', n, 'STREAMS', p .. '{DEMAND}', '>')
  if type(got) ~= 'table' or got['err'] or not got[1] then return end
  for _, entry in ipairs(got[1][2]) do
    redis.call('XACK', p .. '{DEMAND}', '{DEMAND_GROUP}', entry[1])
    redis.call('XDEL', p .. '{DEMAND}', entry[1])
  end
end
"""

# ARGV: prefix. Creates the demand stream and group if missing, with one entry per job already queued.
_ENSURE_DEMAND = f"""
local p = ARGV[1]
local groups = redis.pcall('XINFO', 'GROUPS', p .. '{DEMAND}')
if type(groups) == 'table' and not groups['err'] then
  for _, g in ipairs(groups) do
    for i = 1, #g, 2 do if g[i] == 'name' and g[i + 1] == '{DEMAND_GROUP}' then return 0 end end
  end
end
redis.call('XGROUP', 'CREATE', p .. '{DEMAND}', '{DEMAND_GROUP}', '$', 'MKSTREAM')
local queued = redis.call('ZCARD', p .. 'queued')
for i = 1, queued do redis.call('XADD', p .. '{DEMAND}', '*', 'job', 'queued') end
return 1
"""

# Fair share (jobs/fairshare.py): each caller's queued jobs in `oq:{owner}` (same score as `queued`), the callers
# with jobs queued in the set `owners`, their passes in the hash `fair`, the virtual time in `fair:vt`.
_OWNERS = """
-- The queue's total work in `queued_work`, counted from the queue where the key is missing (a Redis from before
-- it, or one that lost it): true when it was, so the caller's own change is already in the count.
local function count_work(p)
  if redis.call('EXISTS', p .. 'queued_work') == 1 then return false end
  local total = 0
  for _, other in ipairs(redis.call('ZRANGE', p .. 'queued', 0, -1)) do
    total = total + (tonumber(redis.call('HGET', p .. 'job:' .. other, 'work')) or 0)
  end
  redis.call('SET', p .. 'queued_work', total)
  return true
end
local function queue_owner(p, id, score)
  local o = redis.call('HGET', p .. 'job:' .. id, 'owner') or ''
  redis.call('ZADD', p .. 'oq:' .. o, score, id)
  redis.call('SADD', p .. 'owners', o)
  if not count_work(p) then
    redis.call('INCRBY', p .. 'queued_work', tonumber(redis.call('HGET', p .. 'job:' .. id, 'work')) or 0)
  end
end
local function unqueue_owner(p, id)
  local o = redis.call('HGET', p .. 'job:' .. id, 'owner') or ''
  redis.call('ZREM', p .. 'oq:' .. o, id)
  if redis.call('ZCARD', p .. 'oq:' .. o) == 0 then redis.call('SREM', p .. 'owners', o) end
  if not count_work(p) then
    redis.call('DECRBY', p .. 'queued_work', tonumber(redis.call('HGET', p .. 'job:' .. id, 'work')) or 0)
  end
end
"""

# ARGV: prefix, job id ('' for the whole queue). What policy.queued_eta and policy.retry_after_s need, read at
# once: the job's rank in the queue (-1: not queued), the queue's depth and total work (`queued_work`, kept by
# queue_owner and unqueue_owner; counted once here where a Redis lacks it), and the work the running jobs have
# left (policy.work_left: work x steps left / steps; a worker's batch is small).
_WORK = _OWNERS + """
local p, id = ARGV[1], ARGV[2]
local rank = -1
if id ~= '' then
  rank = redis.call('ZRANK', p .. 'queued', id)
  if not rank then return {-1, 0, '0', '0'} end
end
count_work(p)
local total = redis.call('GET', p .. 'queued_work')
local left = 0
for _, other in ipairs(redis.call('ZRANGE', p .. 'running', 0, -1)) do
  local f = redis.call('HMGET', p .. 'job:' .. other, 'work', 'steps', 'step')
  local work, steps, step = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
  if steps > 0 then left = left + work * math.max(0, steps - step) / steps end
end
return {rank, redis.call('ZCARD', p .. 'queued'), tostring(math.max(0, tonumber(total))), tostring(left)}
"""


_SUBMIT = _OWNERS + f"""
local p = ARGV[1]
local max_queue, id, idem_key = tonumber(ARGV[2]), ARGV[3], ARGV[4]
if idem_key ~= '' then
  local existing = redis.call('GET', p .. 'idem:' .. idem_key)
  if existing then return {{'existing', existing}} end
end
if redis.call('ZCARD', p .. 'queued') >= max_queue then return {{'full'}} end
local seq = redis.call('INCR', p .. 'seq')
local fields = cjson.decode(ARGV[5])
local priority = fields['priority']
for k, v in pairs(fields) do redis.call('HSET', p .. 'job:' .. id, k, v) end
redis.call('HSET', p .. 'job:' .. id, 'seq', seq)
redis.call('ZADD', p .. 'queued', {_SCORE}, id)
queue_owner(p, id, {_SCORE})
redis.call('ZADD', p .. 'all', seq, id)
redis.call('ZADD', p .. 'owned:' .. fields['owner'], seq, id)
if fields['deadline'] ~= '' then redis.call('ZADD', p .. 'deadlines', fields['deadline'], id) end
if idem_key ~= '' then redis.call('SET', p .. 'idem:' .. idem_key, id) end
redis.call('XADD', p .. '{DEMAND}', '*', 'job', id)
redis.call('LPUSH', p .. 'wake', 1)
redis.call('LTRIM', p .. 'wake', 0, 0)
return {{'ok', tostring(seq), tostring(redis.call('ZRANK', p .. 'queued', id))}}
"""

# ARGV: prefix, now, lease expiry, worker, batch id, virtual time, ids...
_CLAIM = _CONSUME + _OWNERS + """
local p = ARGV[1]
local vt = tonumber(ARGV[6])
local claimed = {}
redis.call('SET', p .. 'fair:vt', ARGV[6])
for i = 7, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', p .. 'queued', id) == 1 then
    unqueue_owner(p, id)
    local job = redis.call('HMGET', p .. 'job:' .. id, 'owner', 'weight', 'work')
    local owner = job[1] or ''
    local pass = tonumber(redis.call('HGET', p .. 'fair', owner) or ARGV[6])
    if pass < vt then pass = vt end
    redis.call('HSET', p .. 'fair', owner, tostring(pass + (tonumber(job[3]) or 0) / (tonumber(job[2]) or 1)))
    redis.call('ZADD', p .. 'running', ARGV[3], id)
    redis.call('HINCRBY', p .. 'job:' .. id, 'attempts', 1)
    redis.call('HSET', p .. 'job:' .. id, 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[4],
               'batch_id', ARGV[5], 'step', 0)
    table.insert(claimed, id)
  end
end
consume(p, #claimed)
return claimed
"""

# ARGV: prefix, id, status, fields json. Returns the job's hash (flat), 0 if it had already ended, -1 if unknown.
_FINISH = _CONSUME + _OWNERS + """
local p, id = ARGV[1], ARGV[2]
local status = redis.call('HGET', p .. 'job:' .. id, 'status')
if not status then return -1 end
if """ + " or ".join(f"status == '{status.value}'" for status in sorted(FINAL_STATUSES)) + """ then return 0 end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', p .. 'job:' .. id, k, v) end
redis.call('HSET', p .. 'job:' .. id, 'status', ARGV[3])
redis.call('HDEL', p .. 'job:' .. id, 'preview')
if redis.call('ZREM', p .. 'queued', id) == 1 then
  consume(p, 1)
  unqueue_owner(p, id)
end
redis.call('ZREM', p .. 'running', id)
redis.call('ZREM', p .. 'deadlines', id)
redis.call('ZADD', p .. 'finished', fields['finished_at'], id)
-- previews are never kept: once the job ended, its stream keeps none of them either
local stream = p .. 'events:' .. id
for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+')) do
  if string.find(entry[2][2], '"type": "preview"', 1, true) then redis.call('XDEL', stream, entry[1]) end
end
-- the webhook outbox: the end's delivery (ARGV[5]: its webhook event, webhooks.event_name), in the same step
local hook = redis.call('HGET', p .. 'job:' .. id, 'webhook')
if hook and hook ~= '' then
  local name = ARGV[5]
  for _, wanted in ipairs(cjson.decode(hook)['events']) do
    if wanted == name then
      local key = id .. ':' .. name
      if redis.call('ZADD', p .. 'hooks', 'NX', fields['finished_at'], key) == 1 then
        redis.call('HSET', p .. 'hook:' .. key, 'job_id', id, 'event', name, 'attempts', 0,
                   'first_at', fields['finished_at'])
      end
    end
  end
end
return redis.call('HGETALL', p .. 'job:' .. id)
"""

# ARGV: prefix, key, job id, event, due, now, step ('' for none). A delivery joins the webhook outbox once; a
# pending progress delivery not yet tried takes the latest step instead.
_HOOK = """
local p, key = ARGV[1], ARGV[2]
local h = p .. 'hook:' .. key
local attempts = redis.call('HGET', h, 'attempts')
if not attempts then
  redis.call('HSET', h, 'job_id', ARGV[3], 'event', ARGV[4], 'attempts', 0, 'first_at', ARGV[6])
  if ARGV[7] ~= '' then redis.call('HSET', h, 'step', ARGV[7]) end
  redis.call('ZADD', p .. 'hooks', ARGV[5], key)
elseif attempts == '0' and ARGV[7] ~= '' then
  redis.call('HSET', h, 'step', ARGV[7])
end
return 1
"""

# ARGV: prefix, now, lease until, limit. Claims due deliveries: each is due again at the lease's end (if its
# dispatcher dies, another sends it), its attempt counted. Returns each one's key and hash (flat).
_HOOK_CLAIM = """
local p = ARGV[1]
local keys = redis.call('ZRANGEBYSCORE', p .. 'hooks', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, key in ipairs(keys) do
  if redis.call('EXISTS', p .. 'hook:' .. key) == 0 then
    redis.call('ZREM', p .. 'hooks', key)  -- its record is gone (a Redis that lost it): nothing to send
  else
    redis.call('ZADD', p .. 'hooks', ARGV[3], key)
    redis.call('HINCRBY', p .. 'hook:' .. key, 'attempts', 1)
    table.insert(out, key)
    table.insert(out, redis.call('HGETALL', p .. 'hook:' .. key))
  end
end
return out
"""

# ARGV: prefix, finished before (unix time), limit. Retention: deletes ended jobs, their idempotency keys and events.
_PRUNE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'finished', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local idem = redis.call('HGET', p .. 'job:' .. id, 'idem_key')
  if idem and idem ~= '' then redis.call('DEL', p .. 'idem:' .. idem) end
  local owner = redis.call('HGET', p .. 'job:' .. id, 'owner') or ''
  redis.call('DEL', p .. 'job:' .. id, p .. 'events:' .. id, p .. 'hooklog:' .. id)
  redis.call('ZREM', p .. 'all', id)
  redis.call('ZREM', p .. 'owned:' .. owner, id)
  redis.call('ZREM', p .. 'finished', id)
end
-- fair share: a caller with nothing queued and a pass at or below the virtual time would come back at the
-- virtual time anyway; forgetting it changes nothing and keeps the hash as small as the set of active callers
local vt = tonumber(redis.call('GET', p .. 'fair:vt') or '0')
local passes = redis.call('HGETALL', p .. 'fair')
for i = 1, #passes, 2 do
  if tonumber(passes[i + 1]) <= vt and redis.call('SISMEMBER', p .. 'owners', passes[i]) == 0 then
    redis.call('HDEL', p .. 'fair', passes[i])
  end
end
return #ids
"""

# A token bucket in a hash (tokens, at), on Redis's own clock so replicas' clocks never matter. A new bucket
# starts full; the key expires once it would be full again.
_TAKE_TOKENS = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local level = burst
if state[1] then level = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate) end
local taken, retry = 0, 0
if level >= n then taken = 1; level = level - n else retry = (math.min(n, burst) - level) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / rate * 1000) + 1000)
return {taken, tostring(level), tostring(retry)}
"""

# ARGV: prefix, id, count_attempt ('1' keeps the attempt: a lease ran out; '0' gives it back: graceful stop),
# only_if_expired_before (a lease expiry bound, or '' for none). Back to the queue if still running.
_REQUEUE = _OWNERS + f"""
local p, id = ARGV[1], ARGV[2]
if redis.call('HGET', p .. 'job:' .. id, 'status') ~= 'running' then return 0 end
if ARGV[4] ~= '' then
  local lease = redis.call('ZSCORE', p .. 'running', id)
  if (not lease) or tonumber(lease) > tonumber(ARGV[4]) then return 0 end
end
if ARGV[3] == '0' then redis.call('HINCRBY', p .. 'job:' .. id, 'attempts', -1) end
local priority = redis.call('HGET', p .. 'job:' .. id, 'priority')
local seq = redis.call('HGET', p .. 'job:' .. id, 'seq')
redis.call('HSET', p .. 'job:' .. id, 'status', 'queued', 'started_at', '', 'worker', '', 'step', 0)
redis.call('HDEL', p .. 'job:' .. id, 'preview')
redis.call('ZREM', p .. 'running', id)
redis.call('ZADD', p .. 'queued', {_SCORE}, id)
queue_owner(p, id, {_SCORE})
redis.call('XADD', p .. '{DEMAND}', '*', 'job', id)
redis.call('LPUSH', p .. 'wake', 1)
redis.call('LTRIM', p .. 'wake', 0, 0)
return 1
"""


def _ts(value: str | None) -> datetime | None:
    return None if not value else datetime.fromtimestamp(float(value), tz=timezone.utc)


@contextmanager
def _guard() -> Iterator[None]:
    """Every Redis call goes through this: an unreachable or failing Redis is a StorageError, which callers ride
    out (the runner keeps computing, readiness says why); never a raw redis error that reads as a bug."""
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise StorageError(f"the job store (Redis) failed: {exc}") from None


class RedisEventBus:
    """Job events in a Redis stream per job: any process publishes, any process subscribes, and a subscriber
    can resume after an event id (SSE's Last-Event-ID). Listeners see this process's own publishes (metrics)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.p = prefix
        self._listeners: list[Callable[[Event], None]] = []

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def publish(self, job_id: str, event: Event, pipe: Any = None) -> None:
        """Append to the job's stream; with `pipe`, as part of the caller's pipeline (one round trip)."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                pass
        key = f"{self.p}events:{job_id}"
        own = pipe is None
        pipe = self.client.pipeline() if own else pipe
        pipe.xadd(key, {"data": json.dumps(event)}, maxlen=1000, approximate=True)
        pipe.expire(key, EVENTS_TTL_S)
        if own:
            with _guard():
                pipe.execute()

    def last_id(self, job_id: str) -> str:
        with _guard():
            newest = self.client.xrevrange(f"{self.p}events:{job_id}", count=1)
        return newest[0][0] if newest else "0-0"

    @contextmanager
    def subscribe(self, job_id: str, types: frozenset[str] | None = None,
                  after: str | None = None) -> Iterator[asyncio.Queue]:
        """Events after `after` (default: from now), put on an asyncio queue by a reader thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        start = after or self.last_id(job_id)

        def read() -> None:
            last = start
            while not stop.is_set():
                try:
                    batches = self.client.xread({f"{self.p}events:{job_id}": last}, block=500, count=100)
                except Exception:
                    time.sleep(0.5)
                    continue
                for _, entries in batches or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        event = {**json.loads(fields["data"]), "event_id": entry_id}
                        if types is None or event["type"] in types:
                            try:
                                loop.call_soon_threadsafe(queue.put_nowait, event)
                            except RuntimeError:
                                return

        reader = threading.Thread(target=read, name=f"events-{job_id[:8]}", daemon=True)
        reader.start()
        try:
            yield queue
        finally:
            stop.set()


class RedisJobQueue(JobEnds):
    def __init__(self, url: str, *, max_queue: int = 256, default_timeout_s: float | None = None,
                 lease_s: float = 30.0, prefix: str = PREFIX) -> None:
        import redis

        self.client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=10,
                                           socket_timeout=10, socket_connect_timeout=5)
        self.p = prefix
        self.demand_stream = prefix + DEMAND
        self.events = RedisEventBus(self.client, prefix)
        self.max_queue = max_queue
        self.default_timeout_s = default_timeout_s
        self.lease_s = lease_s
        self.accepting = True
        self._submit = self.client.register_script(_SUBMIT)
        self._claim = self.client.register_script(_CLAIM)
        self._finish_script = self.client.register_script(_FINISH)
        self._requeue = self.client.register_script(_REQUEUE)
        self._ensure_demand = self.client.register_script(_ENSURE_DEMAND)
        self._take_tokens = self.client.register_script(_TAKE_TOKENS)
        self._work = self.client.register_script(_WORK)
        self._prune = self.client.register_script(_PRUNE)
        self._hook = self.client.register_script(_HOOK)
        self._hook_claim = self.client.register_script(_HOOK_CLAIM)
        self._demand_ensured = -1e9  # when ensure_demand last ran (monotonic)
        self._unreachable_at = -1e9  # when a call last failed for Redis's sake (monotonic)
        self._owned_indexed = False  # jobs from before the per-owner index are in it (_index_owners)
        self._speed_read: tuple[float, float | None] = (-1e9, None)

    @contextmanager
    def _redis(self) -> Iterator[None]:
        try:
            with _guard():
                yield
        except StorageError:
            self._unreachable_at = time.monotonic()
            raise

    def ping(self) -> None:
        """Reachable, and the autoscaler's stream and group exist (recreated if Redis lost them)."""
        with self._redis():
            self._ensure_demand(args=[self.p])

    def close(self) -> None:
        self.client.close()

    # ----- reading ---------------------------------------------------------------------------
    def _to_job(self, h: dict[str, str], work: list | None = None) -> Job:
        """A job from its hash; `work` is what the _WORK script read with it, in one pipeline (queued jobs)."""
        status = JobStatus(h["status"])
        request = JobRequest.model_validate_json(h["request"])
        step = int(h.get("step") or 0)
        steps = int(h.get("steps") or request.steps)
        if status is JobStatus.succeeded:
            step = steps
        eta = position = None
        speed = self._speed()
        if status is JobStatus.queued and work is not None and int(work[0]) >= 0:
            position = int(work[0])
            eta = policy.queued_eta(position, int(work[1]), float(work[2]), float(work[3]), float(h.get("work") or 0),
                                    speed)
        elif status is JobStatus.running:
            eta = policy.running_eta(steps, step, int(h.get("batch_images") or request.n), speed)
        return Job(
            id=h["id"], status=status, request=request, source=h["source"], queue_position=position,
            progress=(step / steps) if steps else 0.0, step=step, steps=steps,
            eta_s=eta,
            created_at=_ts(h["created_at"]), started_at=_ts(h.get("started_at")),
            finished_at=_ts(h.get("finished_at")), attempts=int(h.get("attempts") or 0),
            error=h.get("error") or None, error_kind=h.get("error_kind") or None,
            images=[ImageRef(**i) for i in json.loads(h.get("images") or "[]")],
            batch_id=h.get("batch_id") or None,
            batch_images=int(h["batch_images"]) if h.get("batch_images") else None,
            worker=h.get("worker") or None,
            label=h.get("label") or None,
            owner=h.get("owner") or "",
        )

    def _hash(self, job_id: str) -> dict[str, str]:
        with self._redis():
            h = self.client.hgetall(f"{self.p}job:{job_id}")
        if not h:
            raise JobNotFound(f"no job {job_id!r}")
        return h

    def get(self, job_id: str) -> Job:
        found = self._jobs([job_id])
        if not found:
            raise JobNotFound(f"no job {job_id!r}")
        return found[0]

    def _jobs(self, ids: Sequence[str], with_position: bool = True) -> list[Job]:
        """The jobs with these ids (unknown ones left out), each record and queue rank in one round trip, with the
        queue's totals (_WORK) read once for all of them."""
        with self._redis():
            pipe = self.client.pipeline()
            for job_id in ids:
                pipe.hgetall(f"{self.p}job:{job_id}")
                if with_position:
                    pipe.zrank(f"{self.p}queued", job_id)
            if with_position:
                self._work(args=[self.p, ""], client=pipe)
            replies = pipe.execute()
        if not with_position:
            return [self._to_job(h) for h in replies if h]
        _, depth, total, left = replies[-1]
        return [self._to_job(h, [-1 if rank is None else rank, depth, total, left])
                for h, rank in zip(replies[:-1:2], replies[1:-1:2]) if h]

    def list(self, *, limit: int = 50, offset: int = 0, status: str | None = None,
             owner: str | None = None) -> list[Job]:
        index = f"{self.p}all" if owner is None else f"{self.p}owned:{owner}"
        if status is None:
            with self._redis():
                ids = self.client.zrevrange(index, offset, offset + limit - 1)
            return self._jobs(ids)
        found: list[Job] = []
        skipped, start = 0, 0
        while len(found) < limit:
            with self._redis():
                ids = self.client.zrevrange(index, start, start + 499)
            if not ids:
                break
            start += len(ids)
            for job in self._jobs(ids):
                if job.status.value == status:
                    if skipped < offset:
                        skipped += 1
                    elif len(found) < limit:
                        found.append(job)
        return found

    def depth(self) -> int:
        with self._redis():
            return self.client.zcard(f"{self.p}queued")

    def _speed(self) -> float | None:
        """Seconds per denoising step of one image, shared by the workers; read at most once a second."""
        now = time.monotonic()
        if now - self._speed_read[0] > 1.0:
            with self._redis():
                value = self.client.get(f"{self.p}speed")
            self._speed_read = (now, float(value) if value else None)
        return self._speed_read[1]

    def retry_after_s(self) -> int:
        speed = self._speed()
        if speed is None:
            return policy.UNKNOWN_RETRY_S
        with self._redis():
            _, _, queued_work, _ = self._work(args=[self.p, ""])
        return policy.retry_after_s(float(queued_work), speed, self.max_queue)

    # ----- client side -----------------------------------------------------------------------
    def idempotent(self, idempotency_key: str, fingerprint: str | None) -> Job | None:
        with self._redis():
            job_id = self.client.get(f"{self.p}idem:{idempotency_key}")
        if job_id is None:
            return None
        h = self._hash(job_id)
        if h.get("idem_hash", "") != (fingerprint or ""):
            raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
        return self.get(job_id)

    def submit(
        self, request: JobRequest, *, source: str = "native", idempotency_key: str | None = None,
        fingerprint: str | None = None, timeout_s: float | None = None, owner: str = "", label: str | None = None,
        weight: float = 1.0,
    ) -> tuple[Job, bool]:
        if not self.accepting:
            raise NotAccepting("the server is shutting down or not ready; retry shortly")
        now = time.time()
        timeout = timeout_s or request.timeout_s or self.default_timeout_s
        job_id = uuid.uuid4().hex
        fields = {
            "id": job_id, "status": "queued", "priority": request.priority, "work": request.steps * request.n,
            "request": request.model_dump_json(), "source": source, "created_at": now,
            "deadline": policy.deadline(now, timeout, request.cancel_after_s) or "", "attempts": 0,
            "steps": request.steps, "webhook": request.webhook or "",
            "idem_hash": fingerprint or "", "idem_key": idempotency_key or "", "images": "[]", "owner": owner, "label": label or "", "weight": weight,
        }
        with self._redis():
            result = self._submit(args=[self.p, self.max_queue, job_id, idempotency_key or "", json.dumps(fields)])
        if result[0] == "existing":
            existing = self.idempotent(idempotency_key or "", fingerprint)
            if existing is None:  # pragma: no cover - the key's job was removed in between
                raise JobNotFound("the job of this Idempotency-Key is gone")
            return existing, False
        if result[0] == "full":
            raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)", self.retry_after_s())
        eta, speed = None, self._speed()
        if speed is not None:
            with self._redis():
                rank, depth, queued_work, left = self._work(args=[self.p, job_id])
            eta = policy.queued_eta(int(rank), int(depth), float(queued_work), float(left), fields["work"], speed)
        job = Job(id=job_id, status=JobStatus.queued, request=request, source=source, queue_position=int(result[2]),
                  steps=request.steps, eta_s=eta, created_at=_ts(str(now)), label=label)
        self._publish("queued", job)
        return job, True

    def cancel(self, job_id: str, running: bool = True) -> Job:
        job = self.get(job_id)
        if job.status.terminal:
            raise JobFinished(f"job {job_id} already {job.status.value}")
        if job.status is JobStatus.running:
            if not running:
                return job
            with self._redis():
                self.client.hset(f"{self.p}job:{job_id}", "cancel", 1)
            return self.get(job_id)
        ended = self.mark_canceled(job_id)
        if ended.status is JobStatus.running and running:  # claimed in between: stop it at its next step instead
            with self._redis():
                self.client.hset(f"{self.p}job:{job_id}", "cancel", 1)
        return ended

    # ----- runner side -----------------------------------------------------------------------
    def claim(
        self, select: Selector | None = None, wait_s: float = 0.5, linger_s: float = 0.0,
        full: Callable[[Sequence[Job]], bool] | None = None, worker: str | None = None,
    ) -> list[Job]:
        deadline = time.monotonic() + wait_s
        linger_until: float | None = None
        while True:
            ids, vt = self._fair_window()
            candidates = self._jobs(ids, with_position=False) if ids else []
            candidates = [j for j in candidates if j.status is JobStatus.queued]
            if candidates:
                chosen = list(select(candidates)) if select else candidates[:1]
                if linger_until is None:
                    linger_until = time.monotonic() + linger_s
                if full is None or full(chosen) or time.monotonic() >= linger_until:
                    claimed = self._claim_ids(chosen, worker, vt)
                    if claimed:
                        return claimed
                    linger_until = None  # another worker took them: look again
                    continue
                self._wait(min(0.02, max(0.0, linger_until - time.monotonic())))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wait(min(remaining, 0.25))

    def _fair_window(self) -> tuple[list[str], float]:
        """The queued job ids the selector sees: the head of the caller whose fair-share turn it is, then the
        queue in order (to fill its batch from); and the virtual time after this turn."""
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(f"{self.p}queued", 0, policy.CLAIM_WINDOW - 1, withscores=True)
            pipe.smembers(f"{self.p}owners")
            pipe.hgetall(f"{self.p}fair")
            pipe.get(f"{self.p}fair:vt")
            window, owners, passes, vt_text = pipe.execute()
            vt = float(vt_text or 0)
            if not window or len(owners) < 2:
                return [i for i, _ in window], vt
            pipe = self.client.pipeline(transaction=False)
            for owner in owners:
                pipe.zrange(f"{self.p}oq:{owner}", 0, 0, withscores=True)
            heads = [(found[0][1], found[0][0], owner) for owner, found in zip(owners, pipe.execute()) if found]
        band = window[0][1] // 1e12  # the top priority (see _SCORE)
        heads = sorted(h for h in heads if h[0] // 1e12 == band)
        if len(heads) < 2:
            return [i for i, _ in window], vt
        owner, vt = fairshare.pick([o for _, _, o in heads], {k: float(v) for k, v in passes.items()}, vt)
        head = next(job_id for _, job_id, o in heads if o == owner)
        return [head, *(i for i, _ in window if i != head)], vt

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._redis():
            self.client.blpop([f"{self.p}wake"], timeout=max(0.01, seconds))

    def _claim_ids(self, chosen: Sequence[Job], worker: str | None, vt: float) -> list[Job]:
        now = time.time()
        batch_id = uuid.uuid4().hex[:12]
        with self._redis():
            ids = self._claim(args=[self.p, now, now + self.lease_s, worker or "", batch_id, repr(vt),
                                    *[j.id for j in chosen]])
            if not ids:
                return []
            images = sum(j.request.n for j in chosen if j.id in set(ids))
            pipe = self.client.pipeline()
            for job_id in ids:
                pipe.hset(f"{self.p}job:{job_id}", "batch_images", images)
            pipe.execute()
        claimed = self._jobs(ids, with_position=False)
        with self._redis():
            pipe = self.client.pipeline()
            for job in claimed:
                self.events.publish(job.id, job_event("started", job), pipe)
                self._outbox(job.id, job.request.webhook, "started", pipe)
            pipe.execute()
        return claimed

    def heartbeat(self, job_ids: Sequence[str]) -> None:
        expiry = time.time() + self.lease_s
        with self._redis():
            pipe = self.client.pipeline()
            for job_id in job_ids:
                pipe.zadd(f"{self.p}running", {job_id: expiry}, xx=True)
            pipe.execute()

    def take_tokens(self, bucket: str, rate: float, burst: float, n: float) -> tuple[bool, float, float]:
        with self._redis():
            taken, level, retry = self._take_tokens(keys=[f"{self.p}{bucket}"], args=[rate, burst, n])
        return bool(taken), float(level), float(retry)

    def shared_get(self, table: str) -> dict[str, str]:
        with self._redis():
            return self.client.hgetall(f"{self.p}shared:{table}")

    def shared_put(self, table: str, key: str, value: str | None) -> None:
        with self._redis():
            if value is None:
                self.client.hdel(f"{self.p}shared:{table}", key)
            else:
                self.client.hset(f"{self.p}shared:{table}", key, value)

    def register_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        now = time.time()
        with self._redis():
            pipe = self.client.pipeline()
            pipe.hset(f"{self.p}workers", info["name"], json.dumps({**info, "last_heartbeat": now}))
            pipe.zadd(f"{self.p}workers:seen", {info["name"]: now + ttl_s})
            pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._redis():
            gone = self.client.zrangebyscore(f"{self.p}workers:seen", "-inf", now)
            if gone:  # forget workers silent past their ttl
                pipe = self.client.pipeline()
                pipe.zrem(f"{self.p}workers:seen", *gone)
                pipe.hdel(f"{self.p}workers", *gone)
                pipe.execute()
            return sorted((json.loads(v) for v in self.client.hvals(f"{self.p}workers")), key=lambda w: w["name"])

    def drop_worker(self, name: str) -> None:
        with self._redis():
            pipe = self.client.pipeline()
            pipe.zrem(f"{self.p}workers:seen", name)
            pipe.hdel(f"{self.p}workers", name)
            pipe.execute()

    def _fields(self, job_ids: Sequence[str], field: str) -> list[str | None]:
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(f"{self.p}job:{job_id}", field)
            return pipe.execute()

    def canceled(self, job_ids: Sequence[str]) -> set[str]:
        return {job_id for job_id, flag in zip(job_ids, self._fields(job_ids, "cancel")) if flag == "1"}

    def deadlines(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        return {job_id: float(v) if v else None for job_id, v in zip(job_ids, self._fields(job_ids, "deadline"))}

    def progress(self, job_ids: Sequence[str], step: int, steps: int, batch_id: str | None = None,
                 previews: Mapping[str, Preview] | None = None) -> Stops:
        previews = previews or {}
        speed = self._speed()
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(f"{self.p}job:{job_id}", "cancel", "status", "batch_id", "batch_images", "webhook")
            states = pipe.execute()
        images = {job_id: int(state[3] or 1) for job_id, state in zip(job_ids, states)}
        hooks = {job_id: state[4] for job_id, state in zip(job_ids, states)}
        stops = Stops(set(), set())
        for job_id, (cancel, status, held_by, _, _) in zip(job_ids, states):
            if status != "running" or (batch_id is not None and held_by != batch_id):
                stops.lost.add(job_id)
            elif cancel == "1":
                stops.canceled.add(job_id)
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                if job_id in stops.canceled or job_id in stops.lost:
                    continue
                pipe.hset(f"{self.p}job:{job_id}", mapping={"step": step, "steps": steps})
                eta = policy.running_eta(steps, step, images[job_id], speed)
                self.events.publish(job_id, progress_event(job_id, step, steps, eta), pipe)
                self._outbox(job_id, hooks[job_id], "progress", pipe, step)
                if job_id in previews:
                    event = preview_event(job_id, step, steps, previews[job_id])
                    pipe.hset(f"{self.p}job:{job_id}", "preview", json.dumps(event))
                    self.events.publish(job_id, event, pipe)
            pipe.execute()
        return stops

    def latest_preview(self, job_id: str) -> Event | None:
        with self._redis():
            status, preview = self.client.hmget(f"{self.p}job:{job_id}", "status", "preview")
        return json.loads(preview) if preview and status == "running" else None

    def record_speed(self, seconds_per_step: float) -> None:
        value = policy.blend_speed(self._speed(), seconds_per_step)
        with self._redis():
            self.client.set(f"{self.p}speed", value)
        self._speed_read = (time.monotonic(), value)

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job:
        values = {k: ("" if v is None else v) for k, v in fields.items()}
        with self._redis():
            done = self._finish_script(args=[self.p, job_id, status.value, json.dumps({**values,
                                                                                   "finished_at": time.time()}),
                                             webhooks.event_name(status.value)])
        if done == -1:
            raise JobNotFound(f"no job {job_id!r}")
        if done == 0:
            return self.get(job_id)
        job = self._to_job(dict(zip(done[::2], done[1::2])))
        self._publish(status.value, job)
        return job

    def requeue(self, job_id: str) -> None:
        """Graceful stop: back to the queue, the attempt not counted."""
        with self._redis():
            self._requeue(args=[self.p, job_id, "0", ""])

    def recover(self) -> int:
        """Jobs whose lease ran out (their worker died) go back to the queue, or fail after MAX_ATTEMPTS
        deliveries. Jobs other workers hold with a live lease are left alone. It also (re)creates the autoscaler's
        stream and group when they are missing, at most every DEMAND_CHECK_S."""
        now = time.time()
        with self._redis():
            if time.monotonic() - self._demand_ensured > DEMAND_CHECK_S:  # a Redis that came back empty
                self._ensure_demand(args=[self.p])
                self._demand_ensured = time.monotonic()
            if not self._owned_indexed:
                self._index_owners()
            expired = self.client.zrangebyscore(f"{self.p}running", "-inf", now)
        if time.monotonic() - self._unreachable_at < self.lease_s:
            # Redis was away lately: no worker could heartbeat meanwhile, so a lease that ran out says nothing of
            # its worker yet. Give every worker one whole lease to renew before taking its jobs away.
            return 0
        requeued = 0
        for job_id in expired:
            with self._redis():
                h = self.client.hgetall(f"{self.p}job:{job_id}")
                if not h or h.get("status") != "running":
                    self.client.zrem(f"{self.p}running", job_id)
                    continue
            attempts = int(h.get("attempts") or 0)
            if attempts >= MAX_ATTEMPTS:
                self.fail(job_id, policy.given_up(attempts), "internal")
                continue
            with self._redis():
                requeued += self._requeue(args=[self.p, job_id, "1", now])
        return requeued

    def _index_owners(self) -> None:
        """Jobs kept from a version without `owned:{owner}` join their owner's index, so a caller's listing
        shows its older jobs too. Once per Redis (a marker key), idempotent if two processes do it at once."""
        marker = f"{self.p}owned:indexed"
        if not self.client.exists(marker):
            start = 0
            while True:
                ids = self.client.zrange(f"{self.p}all", start, start + 499, withscores=True)
                if not ids:
                    break
                pipe = self.client.pipeline(transaction=False)
                for job_id, _ in ids:
                    pipe.hget(f"{self.p}job:{job_id}", "owner")
                owners = pipe.execute()
                pipe = self.client.pipeline(transaction=False)
                for (job_id, seq), owner in zip(ids, owners):
                    if owner is not None:
                        pipe.zadd(f"{self.p}owned:{owner}", {job_id: seq})
                pipe.execute()
                start += len(ids)
            self.client.set(marker, 1)
        self._owned_indexed = True

    def expire(self) -> list[Job]:
        """Reclaim expired leases, then fail jobs whose timeout passed (running ones after a grace)."""
        self.recover()
        now = time.time()
        with self._redis():
            due = self.client.zrangebyscore(f"{self.p}deadlines", "-inf", now)
        ended = []
        for job in self._jobs(due, with_position=False):
            deadline = self.deadlines([job.id])[job.id] or now
            if job.status is JobStatus.queued or (
                    job.status is JobStatus.running and deadline < now - policy.RUNNING_GRACE_S):
                ended.append(self.end_past_deadline(job.id, job.request.cancel_after_s, job.created_at.timestamp(),
                                                    deadline, job.status.value))
        return ended

    def prune(self, finished_before: float, limit: int = 1000) -> int:
        with self._redis():
            return int(self._prune(args=[self.p, repr(finished_before), limit]))

    def _publish(self, kind: str, job: Job) -> None:
        """A job event (queued, or its end: whose webhook delivery _FINISH already queued, with the end)."""
        with self._redis():
            pipe = self.client.pipeline()
            self.events.publish(job.id, job_event(kind, job), pipe)  # type: ignore[arg-type]
            if kind == "queued":
                self._outbox(job.id, job.request.webhook, kind, pipe)
            pipe.execute()

    def _outbox(self, job_id: str, spec: str | None, kind: str, pipe: Any, step: int | None = None) -> None:
        """Queue the webhook delivery this event makes due, in the caller's pipeline (webhooks.py)."""
        name = webhooks.wanted(spec, kind)
        if name is None:
            return
        now = time.time()
        due = now + webhooks.PROGRESS_EVERY_S if name == "progress" else now
        self._hook(args=[self.p, f"{job_id}:{name}", job_id, name, repr(due), repr(now),
                         "" if step is None else step], client=pipe)

    # ----- webhooks (webhooks.Outbox) ---------------------------------------------------------------
    def claim_webhooks(self, limit: int, lease_s: float) -> list[webhooks.Delivery]:
        now = time.time()
        with self._redis():
            if not self.client.zrangebyscore(f"{self.p}hooks", "-inf", now, start=0, num=1):
                return []
            found = self._hook_claim(args=[self.p, repr(now), repr(now + lease_s), limit])
        deliveries = []
        for key, flat in zip(found[::2], found[1::2]):
            h = dict(zip(flat[::2], flat[1::2]))
            deliveries.append(webhooks.Delivery(key, h["job_id"], h["event"], int(h["attempts"]),
                                                float(h["first_at"]), int(h["step"]) if h.get("step") else None))
        return deliveries

    def webhook_attempted(self, delivery: webhooks.Delivery, record: dict[str, Any], retry_at: float | None) -> None:
        log_key = f"{self.p}hooklog:{delivery.job_id}"
        with self._redis():
            pipe = self.client.pipeline()
            pipe.rpush(log_key, json.dumps(record))
            pipe.ltrim(log_key, -webhooks.LOG_KEEP, -1)
            pipe.expire(log_key, EVENTS_TTL_S * 30)
            if retry_at is None:
                pipe.zrem(f"{self.p}hooks", delivery.key)
                pipe.delete(f"{self.p}hook:{delivery.key}")
            else:
                pipe.zadd(f"{self.p}hooks", {delivery.key: retry_at}, xx=True)
            pipe.execute()

    def webhook_release(self, delivery: webhooks.Delivery, due: float) -> None:
        with self._redis():
            pipe = self.client.pipeline()
            pipe.zadd(f"{self.p}hooks", {delivery.key: due}, xx=True)
            pipe.hincrby(f"{self.p}hook:{delivery.key}", "attempts", -1)
            pipe.execute()

    def webhook_log(self, job_id: str) -> list[dict[str, Any]]:
        with self._redis():
            return [json.loads(item) for item in self.client.lrange(f"{self.p}hooklog:{job_id}", 0, -1)]
