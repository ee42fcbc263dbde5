"""Run budgets shared by several hosts through one Redis: the RedisStore (see budget_store for the interface).

Keys (``P`` is ``budgets.store.key_prefix``; every key of a run shares the hash tag ``{run}``):

- ``P{run}:spend`` hash ``usd``, ``tok``: the run's settled spend (1e-10 USD units, tokens).
- ``P{run}:res`` hash reservation id -> "usd tok", and ``P{run}:exp`` sorted set reservation id -> expiry
  (server time, ms): reservations of calls in flight. Each reserve purges the expired ones first, so a
  process that died holding budget frees it after ``reservation_ttl_s``.
- ``P{run}:done:<request id>``: the call was settled (kept DONE_TTL_FACTOR * reservation_ttl_s); settling
  the same request id again, or seeding it from a file, counts nothing.
- ``P{run}:seeded`` hash host -> 1: this host's run file has been added (host = hostname + runs dir).

Every step is one Lua script, run atomically by the server (loaded once, called by EVALSHA):

- reserve: purge expired, read spend and the sum of the reservations, refuse or hold (``budget_store.decide``).
  When this host has not seeded the run (Redis lost its data, or the run is new to the host) it answers
  "seed first": the host reads its file and seeds before the call is judged.
- settle: drop the reservation and, unless ``done`` exists, add the actual spend and set ``done``.
- seed: the host's run file, read in a thread: records whose ``ts`` is within DONE_TTL_FACTOR *
  reservation_ttl_s are sent one by one and counted unless ``done`` exists (so a record this host, or a
  sibling worker, settled live while the file was read counts once); older ones are summed and added
  together with ``HSETNX seeded host`` in the last script, so once per (run, host) even with several workers.

Hence: the run's spend in Redis is the sum of its records over every host's run file, whatever the order of
restarts, and a Redis that lost its data is re-seeded by each host on its next call of the run. It can be
more (never less) than the files when a settlement reached Redis but the process died before flushing the
record, or when a record older than the dedupe window was settled live by a host that had not seeded the run.

Unreachable Redis (connect/socket timeouts of a fraction of a second, no retries): with ``on_unavailable:
refuse`` a budgeted call gets 503 ``budget_store_unavailable``; with ``local`` it is judged by this process's
LocalStore (this host's file and calls: the fleet's bound does not hold meanwhile). Either way settlements
are kept (at most MAX_PENDING) and replayed, in order, once a probe finds Redis back; one WARNING when it
goes, one when it is back. A replayed settlement is idempotent like any other; before calls use Redis
again, the process also re-seeds every run it knows (Redis may have lost its data; a no-op otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy import errors
from proxy.budget_store import SHARED_CAP, Decision, Limits, LocalStore, describe_read_error, read_records
from proxy.config import redact_url
from proxy.records import JsonlSink

log = logging.getLogger("metering_proxy.budgets")

DONE_TTL_FACTOR = 2
MAX_PENDING = 100_000
"""Settlements kept while Redis is unreachable; beyond, the oldest are dropped (and counted in a log line)."""
CONNECT_TIMEOUT_S = 0.25
SOCKET_TIMEOUT_S = 0.5
PROBE_INTERVAL_S = 0.5
_CHUNK = 500
_UNAVAILABLE = (redis_errors.RedisError, OSError, TimeoutError)

_COMMON = """
local CAP = 9007199254740991
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function add(key, field, n)
  local v = tonumber(redis.call('HGET', key, field) or '0') + n
  if v > CAP then v = CAP end
  redis.call('HSET', key, field, string.format('%.0f', v))
end
local function amounts(v)
  local sp = string.find(v, ' ')
  return tonumber(string.sub(v, 1, sp - 1)), tonumber(string.sub(v, sp + 1))
end
"""

# KEYS: spend, res, exp, seeded. ARGV: id, usd, tok, usd limit (-1: none), token limit (-1), ttl ms, host.
_RESERVE = _COMMON + """
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
if redis.call('HEXISTS', KEYS[4], ARGV[7]) == 0 then return {-1} end
local s = redis.call('HMGET', KEYS[1], 'usd', 'tok')
local su, st = tonumber(s[1] or '0'), tonumber(s[2] or '0')
local ru, rt = 0, 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  local u, t = amounts(v)
  ru, rt = ru + u, rt + t
end
local mu, mt = tonumber(ARGV[2]), tonumber(ARGV[3])
local lu, lt = tonumber(ARGV[4]), tonumber(ARGV[5])
local refused = 0
if lu >= 0 and (su >= lu or su + ru + mu > lu) then refused = 1
elseif lt >= 0 and (st >= lt or st + rt + mt > lt) then refused = 2 end
if refused == 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
end
local f = '%.0f'
return {refused, string.format(f, su), string.format(f, st), string.format(f, ru), string.format(f, rt)}
"""

# KEYS: spend, res, exp, done, seeded. ARGV: id, usd, tok, done ttl s, host.
_SETTLE = _COMMON + """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[4]) then
  add(KEYS[1], 'usd', tonumber(ARGV[2]))
  add(KEYS[1], 'tok', tonumber(ARGV[3]))
end
local s = redis.call('HMGET', KEYS[1], 'usd', 'tok')
return {s[1] or '0', s[2] or '0', redis.call('HEXISTS', KEYS[5], ARGV[5])}
"""

# KEYS: spend, seeded, done keys... ARGV: host, done ttl s, last (1/0), lump usd, lump tok, then usd, tok per done key.
_SEED = _COMMON + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    add(KEYS[1], 'usd', tonumber(ARGV[4 + 2 * (i - 2)]))
    add(KEYS[1], 'tok', tonumber(ARGV[5 + 2 * (i - 2)]))
  end
end
if ARGV[3] == '1' and redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 1 then
  add(KEYS[1], 'usd', tonumber(ARGV[4]))
  add(KEYS[1], 'tok', tonumber(ARGV[5]))
end
return 1
"""


def _cap(n: int) -> int:
    return min(max(n, 0), SHARED_CAP)


def _limit(value: int | None) -> int:
    return -1 if value is None else _cap(value)


def host_id(runs_dir: Path) -> str:
    """Who seeds a run file: this machine and its runs dir (the workers of one serve share it)."""
    return f"{socket.gethostname()}:{runs_dir.resolve()}"


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + ".000Z"


class RedisStore:
    """Budget state in one Redis shared by every process and host; see the module docstring."""

    def __init__(self, url: str, sink: JsonlSink, *, key_prefix: str = "metering-proxy:",
                 reservation_ttl_s: float = 1800.0, on_unavailable: str = "refuse",
                 host: str | None = None) -> None:  # fmt: skip
        self.shown = redact_url(url)
        self.sink = sink
        self.prefix = key_prefix
        self.ttl_ms = int(reservation_ttl_s * 1000)
        self.done_ttl_s = max(1, int(reservation_ttl_s * DONE_TTL_FACTOR))
        self.on_unavailable = on_unavailable
        self.host = host or host_id(sink.runs_dir)
        self.redis = Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
                                    retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                    decode_responses=True)  # fmt: skip
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle_script = self.redis.register_script(_SETTLE)
        self._seed_script = self.redis.register_script(_SEED)
        self.local = LocalStore(sink)
        """Judges calls while Redis is unreachable (on_unavailable: local), and this process's fallback view."""
        self.up = True
        self.pending: deque[tuple[str, str, int, int]] = deque(maxlen=MAX_PENDING)
        self.dropped = 0
        self._seeds: dict[str, asyncio.Task[None]] = {}
        self._known: set[str] = set()
        """Every run this process has opened: re-seeded when Redis is reachable again."""
        self._seen: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probe: asyncio.Task[None] | None = None

    def _keys(self, run_id: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{{{run_id}}}"
        return f"{base}:spend", f"{base}:res", f"{base}:exp", f"{base}:seeded"

    def _done(self, run_id: str, rid: str) -> str:
        return f"{self.prefix}{{{run_id}}}:done:{rid}"

    # -- availability ----------------------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            log.warning("budgets: the budget store %s is unreachable (%s: %s); %s until it is back", self.shown,
                        type(exc).__name__, exc, "budgeted calls are refused" if self.on_unavailable == "refuse"
                        else "each process judges calls by its own records")  # fmt: skip
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._until_back(), name="budget-store-probe")

    async def _until_back(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.redis.ping()
                replayed = await self._replay()
                # Redis may have lost its data: add this host's files of the runs it knows again before any
                # call is judged (a no-op for each run whose seeded flag survived).
                for run_id in list(self._known):
                    self._seeds.pop(run_id, None)
                    await self._seed(run_id)
            except _UNAVAILABLE:
                continue
            except errors.RecordingUnavailable:
                pass  # that run's next call reads its file again
            self.up = True
            log.warning("budgets: the budget store %s is reachable again; %d settlement(s) replayed%s", self.shown,
                        replayed, f", {self.dropped} dropped (over {MAX_PENDING})" if self.dropped else "")  # fmt: skip
            self.dropped = 0
            return

    async def _replay(self) -> int:
        n = 0
        while self.pending:
            rid, run_id, usd, tokens = self.pending[0]
            await self._settle_once(rid, run_id, usd, tokens)
            self.pending.popleft()
            n += 1
        return n

    def _keep(self, item: tuple[str, str, int, int]) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(item)

    def _unavailable(self) -> errors.BudgetStoreUnavailable:
        return errors.BudgetStoreUnavailable(
            f"The shared budget store ({self.shown}) is unreachable, so this call's run budget cannot be checked;"
            " budgeted calls are refused until it is back (budgets.store.on_unavailable: refuse)."
        )

    # -- seeding ---------------------------------------------------------------------------------

    def open(self, run_id: str) -> None:
        self._known.add(run_id)
        if run_id not in self._seeds and self.up:
            task = asyncio.get_running_loop().create_task(self._seed(run_id), name=f"budget-seed-{run_id}")
            task.add_done_callback(_retrieved)  # a failed seed is reported to the call that awaits it, if any
            self._seeds[run_id] = task

    async def _seed(self, run_id: str) -> None:
        spend, _, _, seeded = self._keys(run_id)
        try:
            if await self.redis.hexists(seeded, self.host):
                return
            path = self.sink.path_for(run_id)
            try:
                lump_usd, lump_tok, each = await asyncio.to_thread(read_records, path,
                                                                   _iso(time.time() - self.done_ttl_s))  # fmt: skip
            except Exception as exc:
                why = describe_read_error(path, exc)
                log.error("budgets: cannot read %s", why)
                raise errors.RecordingUnavailable(
                    f"Cannot read the records of run {run_id!r} to enforce its budget: {why}") from None
            chunks = [each[i : i + _CHUNK] for i in range(0, len(each), _CHUNK)] or [[]]
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                args: list[Any] = [self.host, self.done_ttl_s, int(last), _cap(lump_usd), _cap(lump_tok)]
                for _, usd, tok in chunk:
                    args += [_cap(usd), _cap(tok)]
                keys = [spend, seeded, *(self._done(run_id, rid) for rid, _, _ in chunk)]
                await self._seed_script(keys=keys, args=args)
        except BaseException:
            if self._seeds.get(run_id) is asyncio.current_task():
                del self._seeds[run_id]  # the run's next call tries again
            raise

    # -- the interface ---------------------------------------------------------------------------

    async def reserve(self, run_id: str, reservation_id: str, usd: int, tokens: int, limits: Limits) -> Decision:
        if self.up:
            try:
                return await self._reserve_shared(run_id, reservation_id, usd, tokens, limits)
            except _UNAVAILABLE as exc:
                self._down(exc)
        if self.on_unavailable == "refuse":
            raise self._unavailable()
        return await self.local.reserve(run_id, reservation_id, usd, tokens, limits)

    async def _reserve_shared(self, run_id: str, rid: str, usd: int, tokens: int, limits: Limits) -> Decision:
        for _ in range(3):
            self.open(run_id)
            seeding = self._seeds.get(run_id)
            if seeding is None:  # marked down meanwhile
                raise redis_errors.ConnectionError("the budget store went down")
            await asyncio.shield(seeding)
            args: list[str | int] = [rid, _cap(usd), _cap(tokens), _limit(limits.usd), _limit(limits.tokens),
                                     self.ttl_ms, self.host]
            got = await self._reserve(keys=list(self._keys(run_id)), args=args)
            if int(got[0]) == -1:  # not seeded by this host: Redis lost its data since, or a sibling's seed failed
                self._seeds.pop(run_id, None)
                continue
            code, su, st, ru, rt = (int(x) for x in got)
            self._seen[run_id] = (su, st)
            return Decision({0: None, 1: "usd", 2: "tokens"}[code], su, st, ru, rt)
        raise self._unavailable()

    def settle(self, reservation_id: str, run_id: str | None, usd: int, tokens: int) -> None:
        self.local.settle(reservation_id, run_id, usd, tokens)
        if run_id is None:
            return  # no run, no reservation in Redis
        if not self.up:
            self._keep((reservation_id, run_id, usd, tokens))
            return
        task = asyncio.get_running_loop().create_task(self._settle(reservation_id, run_id, usd, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, rid: str, run_id: str, usd: int, tokens: int) -> None:
        try:
            await self._settle_once(rid, run_id, usd, tokens)
        except _UNAVAILABLE as exc:
            self._keep((rid, run_id, usd, tokens))
            self._down(exc)

    async def _settle_once(self, rid: str, run_id: str, usd: int, tokens: int) -> None:
        spend, res, exp, seeded = self._keys(run_id)
        got = await self._settle_script(keys=[spend, res, exp, self._done(run_id, rid), seeded],
                                        args=[rid, _cap(usd), _cap(tokens), self.done_ttl_s, self.host])  # fmt: skip
        self._seen[run_id] = (int(got[0]), int(got[1]))
        if not int(got[2]):  # Redis lost this host's file (or never had it): add it
            self._seeds.pop(run_id, None)
            self.open(run_id)

    async def spend(self, run_id: str) -> tuple[int, int] | None:
        got = await self.redis.hmget(self._keys(run_id)[0], "usd", "tok")
        if got[0] is None and got[1] is None:
            return None
        return int(got[0] or 0), int(got[1] or 0)

    def seen_spend(self, run_id: str) -> tuple[int, int] | None:
        return self._seen.get(run_id)

    async def drain(self) -> None:
        """Wait for the settlements scheduled so far (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self._probe is not None:
            self._probe.cancel()
        for task in self._seeds.values():
            task.cancel()
        await self.redis.aclose()
