"""Job records in Redis: the submit-and-poll contract's source of truth.

A job is a Redis hash (`aethercore:job:{id}`) plus a Redis Stream of its events
(`aethercore:job:{id}:events`). Status transitions run as one Lua script, so a job ends
exactly once (a redelivered or cancelled job cannot be finished twice), and the `done`
event is appended in the same step: a waiter reading the stream from its start can never
miss the end of a job, however late it arrives. Both keys expire `result_ttl` seconds
after the last transition.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from loguru import logger

from tasks.deadletters import LUA as DEAD_LETTER_LUA
from tasks.deadletters import NO_OWNER, limits_arg
from tasks.deadletters import render as dead_letter_lua
from tasks.errors import CANCELLED as CANCELLED_CODE
from tasks.errors import error_body
from tasks.holdings import DEAD_LETTERS, DELIVERIES, IDEMPOTENCY, Holdings, Quota, with_holdings
from tasks.names import (
    INFLIGHT_HOLDERS,
    INFLIGHT_PREFIX,
    LANES,
    QUEUED_PREFIX,
    RECENT_JOBS,
    RECENT_JOBS_MAX,
    WEBHOOK_DELIVERY_PREFIX,
    WEBHOOKS_DUE,
    inflight_key,
    job_events_key,
    job_key,
    lane_list,
    queued_key,
    worker_key,
)
from tasks.redis_client import send_now_read_later
from tasks.results import expand
from tasks.script_batch import ScriptBatch
from tasks.states import CANCELLED, QUEUED, RUNNING, TERMINAL
from tasks.webhooks import DELIVERY_ID_PREFIX, KEEP_DELIVERY_S

# A job that has not ended is kept at least this long, whatever its own (shorter) retention: the retention
# counts from its end.
KEEP_UNFINISHED_S = 3600
# Bytes a webhook delivery is charged besides its webhook's JSON (its hash, field names and due entry), and an
# Idempotency-Key's record besides its name and value: what each holds until the body or answer is added.
DELIVERY_OVERHEAD = 256
KEY_OVERHEAD = 96
# A transition's outcome for a job whose record breaks the script (JobStore._transitions): it does not run, nor end.
BROKEN = -2

# ARGV: status, ttl, event ('status' | 'done'), wake note ('' for none), holder, payload, then field/value pairs.
# For a `done` transition the 5th and 6th are instead the dead-letter reason ('' for none) and the dead letters'
# bounds (tasks/deadletters.py limits_arg).
#
# `running`: the worker named `holder` takes the job, and `payload` (how to queue it again) goes into that
# worker's in-flight hash, which the reaper requeues from if the worker dies. A job running on another
# worker that is still alive is not taken (a second copy of its message: the broker redelivered it, or
# the reaper requeued it from a worker only thought dead) -> 0, like a job that already ended.
# A `done` transition removes the job from its holder's in-flight hash and publishes the note — a JSON
# object of the job's ending fields, completed here with the `result` and `error` values being written, so
# the result crosses the wire once — to every reply channel in the job's `notify` (the API processes
# waiting for it), in the same step: only a job that really ended wakes anyone.
#
# The step for one job, a Lua function of the job's keys (K) and arguments (A, the ARGV described above): run
# for one job by _TRANSITION, for each job of a message or a batch by _TRANSITION_MANY, which differ only in how
# `wake` sends the notes.
_TRANSITION_STEP = """
local function clock()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
-- Whom a job's delivery is charged to: its webhook's owner ({url, owner}), else the job's.
local function hook_owner(hook, job)
  local ok, decoded = pcall(cjson.decode, hook)
  if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then return decoded.owner end
  return redis.call('HGET', job, 'owner') or 'NO_OWNER'
end
local function transition(K, A)
local current = redis.call('HGET', K[1], 'status')
if not current then return -1 end
if $IS_TERMINAL(current) then
  return 0
end
local job_id = string.sub(K[1], JOB_PREFIX_LEN + 1)
local holder = redis.call('HGET', K[1], 'holder')
local ttl = redis.call('HGET', K[1], 'ttl') or A[2]  -- the job's own retention, if it asked for one
-- A dead letter keeps what it takes to run the job again: its payload, before it leaves the job or the in-flight hash.
local replay = ''
if A[3] == 'done' and A[5] ~= '' then
  replay = redis.call('HGET', K[1], 'payload')
    or (holder and redis.call('HGET', 'INFLIGHT_PREFIX' .. holder, job_id)) or ''
end
if A[1] == $RUNNING then
  if current ~= $QUEUED and current ~= $RUNNING then return 0 end
  if current == $RUNNING and holder and redis.call('EXISTS', 'WORKER_PREFIX' .. holder) == 1 then return 0 end
end
if current == $QUEUED then  -- it leaves the queue: no longer a candidate for re-queueing
  redis.call('ZREM', 'QUEUED_PREFIX' .. redis.call('HGET', K[1], 'device'), job_id)
  redis.call('HDEL', K[1], 'payload')
end
if A[1] == $RUNNING then
  if holder and holder ~= A[5] then redis.call('HDEL', 'INFLIGHT_PREFIX' .. holder, job_id) end
  redis.call('HDEL', K[1], 'pass')
  redis.call('HSET', K[1], 'status', $RUNNING, 'holder', A[5], unpack(A, 7))
  redis.call('HSET', 'INFLIGHT_PREFIX' .. A[5], job_id, A[6])
  redis.call('SADD', 'INFLIGHT_HOLDERS', A[5])
  local attempts = redis.call('HINCRBY', K[1], 'attempts', 1)
  -- Kept while it runs even if its own retention is shorter (the retention counts from its end).
  redis.call('EXPIRE', K[1], math.max(tonumber(ttl), KEEP_UNFINISHED_S))
  return attempts
end
redis.call('HSET', K[1], 'status', A[1], unpack(A, 7))
if A[3] == 'done' then
  if holder then
    redis.call('HDEL', 'INFLIGHT_PREFIX' .. holder, job_id)
    redis.call('HDEL', K[1], 'holder')
  end
  -- A job nobody follows that streamed nothing has no event stream: its `done` would cost ~4.7 KB of Redis
  -- (a stream's first node) for no reader. A follower marks the job `followed` first (_FOLLOW).
  if redis.call('EXISTS', K[2]) == 1 or redis.call('HEXISTS', K[1], 'followed') == 1 then
    redis.call('XADD', K[2], 'MAXLEN', '~', 100000, '*', 'type', 'done', 'status', A[1])
  end
  -- One read for both: the API processes waiting for it, and its webhook (a job without one costs nothing more).
  local ending = redis.call('HMGET', K[1], 'notify', 'webhook')
  local notify, hook = ending[1], ending[2]
  if notify and A[4] ~= '' then
    local result, err = 'null', 'null'
    for i = 7, #A - 1, 2 do
      if A[i] == 'result' then result = A[i + 1] elseif A[i] == 'error' then err = A[i + 1] end
    end
    local note = string.sub(A[4], 1, -2) .. ',"result":' .. result .. ',"error":' .. err .. '}'
    for channel in string.gmatch(notify, '[^,]+') do wake(channel, note) end
  end
  if hook then  -- its webhook delivery is due, durably, in the step that ends it (tasks/webhooks.py)
    local id = 'DELIVERY_ID_PREFIX' .. job_id
    local queue = redis.call('HGET', K[1], 'device') or ''
    redis.call('HSET', 'WEBHOOK_DELIVERY_PREFIX' .. id, 'kind', 'job', 'ref', job_id, 'webhook', hook, 'event', A[1],
      'queue', queue)
    redis.call('EXPIRE', 'WEBHOOK_DELIVERY_PREFIX' .. id, KEEP_DELIVERY_S)
    redis.call('ZADD', 'WEBHOOKS_DUE', 'NX', 0, id)
    -- charged to the webhook's owner until the dispatcher ends it (force: bounded when the request is admitted)
    local now = clock()
    hold_put(hook_owner(hook, K[1]), 'DELIVERIES_KIND', id, DELIVERY_OVERHEAD + #hook + #queue, now + KEEP_DELIVERY_S,
      now, 0, 0, 0, true)
  end
  if A[5] ~= '' then  -- a dead letter (tasks/deadletters.py): only a job that ends as one pays for it
    local info = redis.call('HMGET', K[1], 'device', 'kind', 'model_id', 'owner', 'role', 'request_id', 'ttl')
    local err = ''
    for i = 7, #A - 1, 2 do
      if A[i] == 'error' then err = A[i + 1] end
    end
    dead_put(job_id, info[1] or 'unknown', A[5], clock(), info[4] or '', A[6], {'kind', info[2] or '',
      'model_id', info[3] or '', 'role', info[5] or '', 'request_id', info[6] or '', 'error', err,
      'request', dead_request(replay), 'result_ttl', info[7] or '', 'webhook', hook or ''})
  end
end
redis.call('EXPIRE', K[1], ttl)
redis.call('EXPIRE', K[2], ttl)
return 1
end
"""

_TRANSITION = (
    "local function wake(channel, note) redis.call('PUBLISH', channel, note) end\n"
    + _TRANSITION_STEP
    + "return transition(KEYS, ARGV)\n"
)

# Several jobs in one call: KEYS are each job's two keys; ARGV the number of jobs, then per job the number of its
# arguments and the arguments. Returns each job's outcome. The notes of the jobs it ends go out as ONE message per
# reply channel, a JSON array: an API process waiting for a whole batch is woken by one message, not one per job
# (each cost its reply listener a pubsub read and a decode, and Redis a PUBLISH).
_TRANSITION_MANY = (
    """
local notes, channels = {}, {}
local function wake(channel, note)
  if not notes[channel] then notes[channel] = {}; table.insert(channels, channel) end
  table.insert(notes[channel], note)
end
"""
    + _TRANSITION_STEP
    + """
-- A job whose record breaks its step (overwritten with another type, a field that is not a number) would fail the
-- whole call, on every retry, stopping every job after it: it is caught here instead, its outcome is
-- {$BROKEN, the error} and the others go on. A refusal that passes (Redis at its maxmemory, loading, a replica)
-- still fails the call, which its caller retries; it comes at the first write, before any step was taken.
local passing = {'OOM', 'READONLY', 'LOADING', 'BUSY', 'MASTERDOWN', 'TRYAGAIN', 'NOREPLICAS'}
local outcomes, at = {}, 2
for i = 1, tonumber(ARGV[1]) do
  local count = tonumber(ARGV[at])
  local ok, outcome = pcall(transition, {KEYS[2 * i - 1], KEYS[2 * i]}, {unpack(ARGV, at + 1, at + count)})
  if not ok then
    local text = type(outcome) == 'table' and outcome.err or tostring(outcome)
    for _, word in ipairs(passing) do
      if string.sub(text, 1, #word) == word then error(outcome) end
    end
    outcome = {$BROKEN, text}
  end
  outcomes[i] = outcome
  at = at + 1 + count
end
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, '[' .. table.concat(notes[channel], ',') .. ']')
end
return outcomes
"""
)


# A dead worker's in-flight jobs, taken over by the reaper in one atomic step (so two reapers never both
# take them): every job it was running goes back to `queued`, with its payload and in its queue's index of
# unstarted jobs again (so should the reaper die before it publishes them, or the message be lost, the
# sweep of stale queued jobs finds them). A job that was in a forward pass of its own when its worker died
# (`pass` = 'alone', written by the worker as it hands the pass to the model) is charged a crash: it may be
# what killed it. Jobs in a shared pass, or not yet in one, are not. ARGV: dead worker, now.
# Returns job id, payload, crashes per job taken.
_REAP = """
if redis.call('EXISTS', 'WORKER_PREFIX' .. ARGV[1]) == 1 then return {} end
local entries = redis.call('HGETALL', 'INFLIGHT_PREFIX' .. ARGV[1])
redis.call('DEL', 'INFLIGHT_PREFIX' .. ARGV[1])
redis.call('SREM', 'INFLIGHT_HOLDERS', ARGV[1])
local taken = {}
for i = 1, #entries, 2 do
  local key = 'JOB_PREFIX' .. entries[i]
  if redis.call('HGET', key, 'status') == $RUNNING and redis.call('HGET', key, 'holder') == ARGV[1] then
    local crashes = tonumber(redis.call('HGET', key, 'crashes') or '0')
    if redis.call('HGET', key, 'pass') == 'alone' then crashes = redis.call('HINCRBY', key, 'crashes', 1) end
    redis.call('HDEL', key, 'pass', 'holder')
    redis.call('HSET', key, 'status', $QUEUED, 'payload', entries[i + 1])
    redis.call('ZADD', 'QUEUED_PREFIX' .. redis.call('HGET', key, 'device'), ARGV[2], entries[i])
    table.insert(taken, entries[i]); table.insert(taken, entries[i + 1]); table.insert(taken, crashes)
  end
end
return taken
"""

# A running job whose live holder has stopped working on it (workers/reaper.py decides that from the holder's
# published active jobs), taken back to `queued` like a dead worker's job, with a crash charged: whatever
# dropped it may do so again, and AETHERCORE_MAX_ATTEMPTS bounds how often. Only if it is still running on that
# holder, still in its in-flight hash, and was not started again since the reaper looked (started_at).
# ARGV: holder, job id, now, the started_at the reaper saw. Returns {payload, crashes}, or nothing.
_RECLAIM = """
local key = 'JOB_PREFIX' .. ARGV[2]
local payload = redis.call('HGET', 'INFLIGHT_PREFIX' .. ARGV[1], ARGV[2])
if not payload then return nil end
if redis.call('HGET', key, 'status') ~= $RUNNING or redis.call('HGET', key, 'holder') ~= ARGV[1]
   or redis.call('HGET', key, 'started_at') ~= ARGV[4] then
  return nil
end
redis.call('HDEL', 'INFLIGHT_PREFIX' .. ARGV[1], ARGV[2])
local crashes = redis.call('HINCRBY', key, 'crashes', 1)
redis.call('HDEL', key, 'pass', 'holder')
redis.call('HSET', key, 'status', $QUEUED, 'payload', payload)
redis.call('ZADD', 'QUEUED_PREFIX' .. redis.call('HGET', key, 'device'), ARGV[3], ARGV[2])
return {payload, crashes}
"""

# Jobs of one queue that have waited STALE seconds or more while the queue itself is empty (every priority lane's
# list, KEYS): their message is gone (a worker killed between taking it from the broker and starting it, or, for a
# job created before its message is sent — an Idempotency-Key, a broker of its own — an API process killed between
# the two). Each is claimed for another STALE seconds (so several sweepers queue it once) and returned with its
# payload. ARGV: queue, now, stale seconds, limit.
_SWEEP_QUEUED = """
for _, list in ipairs(KEYS) do
  if redis.call('LLEN', list) > 0 then return {} end
end
local index = 'QUEUED_PREFIX' .. ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]), 'LIMIT', 0, ARGV[4])
local found = {}
for _, id in ipairs(ids) do
  local key = 'JOB_PREFIX' .. id
  local payload = redis.call('HGET', key, 'payload')
  if redis.call('HGET', key, 'status') == $QUEUED and payload then
    redis.call('ZADD', index, ARGV[2], id)
    table.insert(found, id); table.insert(found, payload)
  else
    redis.call('ZREM', index, id)  -- started, ended or expired meanwhile
  end
end
return found
"""


def _render(script: str) -> str:
    """The Lua scripts name states and keys through the same constants as the Python code (tasks/states.py,
    tasks/names.py): `$QUEUED`, `$RUNNING`, `$IS_TERMINAL(var)` and the key prefixes are filled in here."""
    script = re.sub(
        r"\$IS_TERMINAL\((\w+)\)",
        lambda m: "(" + " or ".join(f"{m.group(1)} == '{state}'" for state in TERMINAL) + ")",
        script,
    )
    script = script.replace("$QUEUED", f"'{QUEUED}'").replace("$RUNNING", f"'{RUNNING}'")
    script = script.replace("$BROKEN", str(BROKEN))
    return (
        script.replace("JOB_PREFIX_LEN", str(len(job_key(""))))
        .replace("JOB_PREFIX", job_key(""))
        .replace("WORKER_PREFIX", worker_key(""))
        .replace("INFLIGHT_PREFIX", INFLIGHT_PREFIX)
        .replace("INFLIGHT_HOLDERS", INFLIGHT_HOLDERS)
        .replace("QUEUED_PREFIX", QUEUED_PREFIX)
        .replace("KEEP_UNFINISHED_S", str(KEEP_UNFINISHED_S))
        .replace("WEBHOOK_DELIVERY_PREFIX", WEBHOOK_DELIVERY_PREFIX)
        .replace("DELIVERY_ID_PREFIX", DELIVERY_ID_PREFIX)
        .replace("KEEP_DELIVERY_S", str(KEEP_DELIVERY_S))
        .replace("WEBHOOKS_DUE", WEBHOOKS_DUE)
        .replace("DELIVERIES_KIND", DELIVERIES)
        .replace("IDEMPOTENCY_KIND", IDEMPOTENCY)
        .replace("DELIVERY_OVERHEAD", str(DELIVERY_OVERHEAD))
        .replace("KEY_OVERHEAD", str(KEY_OVERHEAD))
        .replace("NO_OWNER", NO_OWNER)
    )


def _charging(script: str) -> str:
    """A script that charges what it writes to its owner (tasks/holdings.py), with the dead letter's writer."""
    return with_holdings(dead_letter_lua(DEAD_LETTER_LUA) + _render(script))


# Add a reply channel to a job that has not ended yet, and return the job: one atomic step, so either
# the caller sees the job ended or the worker that ends it sees the channel.
_WATCH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if not $IS_TERMINAL(status) then
  local notify = redis.call('HGET', KEYS[1], 'notify') or ''
  if not string.find(',' .. notify .. ',', ',' .. ARGV[1] .. ',', 1, true) then
    if notify == '' then notify = ARGV[1] else notify = notify .. ',' .. ARGV[1] end
    redis.call('HSET', KEYS[1], 'notify', notify)
  end
end
return redis.call('HGETALL', KEYS[1])
"""

# A reader is about to follow the job's event stream: from now on its end is written there even if it streams
# nothing. Returns {status, whether the stream exists}, or nothing for an unknown job.
_FOLLOW = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
redis.call('HSET', KEYS[1], 'followed', '1')
return {status, redis.call('EXISTS', KEYS[2])}
"""

# A streamed chunk is appended once: an index below the count already published (a redelivered job
# generating again) is skipped. Returns 1 appended, 0 skipped, -1 job not running, -2 cancel requested.
_APPEND_CHUNK = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= $RUNNING then return -1 end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return -2 end
local published = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '0')
if tonumber(ARGV[1]) < published then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', 'chunk', 'index', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[1], 'chunks', tonumber(ARGV[1]) + 1)
redis.call('EXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'ttl') or ARGV[3])
return 1
"""

# A status note in a running job's stream (e.g. `queued`: it waits for room in the model's running batch).
_APPEND_STATUS = """
if redis.call('HGET', KEYS[1], 'status') ~= $RUNNING then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', 'status', 'data', ARGV[1])
redis.call('EXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'ttl') or ARGV[2])
return 1
"""

# Cancel: a queued job ends at once (it will never run); a running one is asked to stop.
_REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == $QUEUED then return 2 end
if status == $RUNNING then redis.call('HSET', KEYS[1], 'cancel_requested', '1'); return 1 end
return 0
"""

# Create a job unless the caller is over a rate limit: the limit's counters and the job record in one
# round trip. KEYS: job, recent-jobs index, the queue's index of unstarted jobs, one counter per limit, then the
# Idempotency-Key's record when the request carries one. ARGV: ttl, now, job id, number of limits, (amount, window
# seconds) per limit, the request's fingerprint, the key's retention, the key's owner and the most keys it may hold
# ('' '' '' '' without a key), then the job's field/value pairs. Returns {1, used...} created, {0, limit index, ms
# until that window ends} refused, {4, holdings refusal} for a new key past its owner's quota, or, for a key already
# used: {2, job id} (the same request: that job, if it is still kept) or {3, job id} (another request).
# The key is taken (and charged to its owner, tasks/holdings.py IDEMPOTENCY) in the same step as the job is created:
# two requests with one key create one job, a request refused here (rate limit, quota) leaves the key free, and a
# replay of a key already held is never refused.
_CREATE_LIMITED = """
local n = tonumber(ARGV[4])
local idem = KEYS[4 + n]
local fingerprint, key_ttl, key_owner = ARGV[5 + 2 * n], ARGV[6 + 2 * n], ARGV[7 + 2 * n]
if idem then
  local held = redis.call('GET', idem)
  if held then
    local kept, job = string.match(held, '^(%S+) (%S+)$')
    if kept ~= fingerprint then return {3, job or ''} end
    if job and redis.call('EXISTS', 'JOB_PREFIX' .. job) == 1 then return {2, job} end
    -- its job is no longer kept (its retention ended): the key is free again
  end
end
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  if used >= tonumber(ARGV[3 + 2 * i]) then
    return {0, i, redis.call('PTTL', KEYS[3 + i])}
  end
end
local record = fingerprint .. ' ' .. ARGV[3]
if idem then
  local now = tonumber(ARGV[2])
  local charged = hold_put(key_owner, 'IDEMPOTENCY_KIND', idem, KEY_OVERHEAD + #idem + #record,
    now + tonumber(key_ttl), now, 0, ARGV[8 + 2 * n], 0, false)
  if charged < 0 then return {4, charged} end
end
local reply = {1}
for i = 1, n do
  local used = redis.call('INCR', KEYS[3 + i])
  if used == 1 then redis.call('EXPIRE', KEYS[3 + i], ARGV[4 + 2 * i]) end
  reply[i + 1] = used
end
if idem then
  redis.call('SET', idem, record, 'EX', key_ttl)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9 + 2 * n))
redis.call('EXPIRE', KEYS[1], math.max(tonumber(ARGV[1]), KEEP_UNFINISHED_S))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return reply
"""

# Create several queued jobs bound for one queue and push the one broker message that carries them, in one step: the
# API's flat-combined submissions (api/dispatch.py) pay one round trip for all of them, and a job exists exactly when
# its message is queued. KEYS: recent-jobs index, the queue's index of unstarted jobs, the broker list, then per job:
# its key and one counter per limit. ARGV: the message, the number of jobs, then per job: job id, now, ttl, number of
# limits n, (amount, window seconds) x n, number of field/value pairs m, the pairs. Every limit is checked first, the
# jobs before it in this call counted: any job over a limit -> {0, {limit index, ms until its window ends} or {} per
# job}, and nothing is written (the caller leaves the refused ones out and calls again). Else {1, {used...} per job}.
_CREATE_MANY_PUSH = """
local count = tonumber(ARGV[2])
local jobs, pending, refused = {}, {}, false
local a, k = 3, 4
for j = 1, count do
  local job = {key = KEYS[k], id = ARGV[a], now = ARGV[a + 1], ttl = tonumber(ARGV[a + 2]), limits = {}}
  local n = tonumber(ARGV[a + 3])
  a, k = a + 4, k + 1
  local verdict = {}
  for i = 1, n do
    local key, amount, window = KEYS[k], tonumber(ARGV[a]), ARGV[a + 1]
    job.limits[i] = {key, window}
    local used = pending[key] or tonumber(redis.call('GET', key) or '0')
    if #verdict == 0 and used >= amount then verdict = {i, redis.call('PTTL', key)} end
    a, k = a + 2, k + 1
  end
  if #verdict == 0 then
    for i = 1, n do
      local key = job.limits[i][1]
      pending[key] = (pending[key] or tonumber(redis.call('GET', key) or '0')) + 1
    end
  else
    refused = true
  end
  job.verdict = verdict
  local m = tonumber(ARGV[a])
  job.first, job.last = a + 1, a + 2 * m
  a = a + 1 + 2 * m
  jobs[j] = job
end
if refused then
  local reply = {}
  for j = 1, count do reply[j] = jobs[j].verdict end
  return {0, reply}
end
local reply = {}
for j = 1, count do
  local job = jobs[j]
  local used = {}
  for i = 1, #job.limits do
    used[i] = redis.call('INCR', job.limits[i][1])
    if used[i] == 1 then redis.call('EXPIRE', job.limits[i][1], job.limits[i][2]) end
  end
  redis.call('HSET', job.key, unpack(ARGV, job.first, job.last))
  redis.call('EXPIRE', job.key, math.max(job.ttl, KEEP_UNFINISHED_S))
  redis.call('ZADD', KEYS[1], job.now, job.id)
  redis.call('ZADD', KEYS[2], job.now, job.id)
  reply[j] = used
end
redis.call('LPUSH', KEYS[3], ARGV[1])
return {1, reply}
"""

# An Idempotency-Key whose job could not be queued is freed (only if it still names that job), and leaves its owner's
# account: a failed creation does not hold the key. KEYS: the key's record. ARGV: job id, the key's owner.
_RELEASE_KEY = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, -string.len(ARGV[1])) == ARGV[1] then
  hold_drop(ARGV[2], 'IDEMPOTENCY_KIND', KEYS[1])
  return redis.call('DEL', KEYS[1])
end
return 0
"""

CHUNK_APPENDED, CHUNK_SKIPPED, CHUNK_NOT_RUNNING, CHUNK_CANCELLED = 1, 0, -1, -2


def requeue_payload(task: str, queue: str, kwargs: dict[str, Any]) -> bytes:
    """What the reaper needs to queue a job again: the Celery task, its queue and its arguments."""
    return encode({"task": task, "queue": queue, "kwargs": kwargs})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def new_job_id() -> str:
    # 128 random bits as 32 hex digits, uuid4().hex's shape without building a UUID (two ids per request).
    return secrets.token_hex(16)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobNotFound(KeyError):
    pass


class IdempotencyConflict(Exception):
    """An Idempotency-Key already used by this caller: `reused` False for the same request (its job is `job_id`),
    True for a different request under the same key."""

    def __init__(self, job_id: str, reused: bool) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.reused = reused


class RateLimited(Exception):
    """The caller is over a rate limit; nothing was created."""

    def __init__(self, index: int, retry_after_ms: int) -> None:
        super().__init__(f"rate limit {index} exceeded")
        self.index = index
        self.retry_after_s = max(1, -(-max(retry_after_ms, 0) // 1000))


def encode(value: Any) -> bytes:
    """JSON as bytes, once: numpy arrays (embeddings, tensors) serialise without a Python list in between."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


class JobStore:
    # The index of recent jobs is trimmed once per this many creations, not on every request.
    TRIM_EVERY = 256

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        dead_letter_ttl: int = 7 * 86400,
        dead_letter_max: int = 10_000,
        quotas: Mapping[str, Quota] | None = None,
    ) -> None:
        """`quotas`: each kind's per-owner limits (tasks/holdings.py quotas_from): the dead letters a job's end
        writes and the Idempotency-Keys its creation takes are charged and bounded with them."""
        self.redis = client
        self.ttl_s = ttl_s
        self.quotas = dict(quotas or {})
        # Dead letters (tasks/deadletters.py) written by the job's end: their retention, how many per queue, per owner.
        self.dead_letter_spec = limits_arg(dead_letter_ttl, dead_letter_max, self.quotas.get(DEAD_LETTERS, Quota()))
        self.holdings = Holdings(client, self.quotas)
        self._release_key = client.register_script(_charging(_RELEASE_KEY))
        self._transition = client.register_script(_charging(_TRANSITION))
        self._transition_many = client.register_script(_charging(_TRANSITION_MANY))
        self._reap = client.register_script(_render(_REAP))
        self._reclaim = client.register_script(_render(_RECLAIM))
        self._append_chunk = client.register_script(_render(_APPEND_CHUNK))
        self._append_status = client.register_script(_render(_APPEND_STATUS))
        self._request_cancel = client.register_script(_render(_REQUEST_CANCEL))
        self._watch = client.register_script(_render(_WATCH))
        self._follow = client.register_script(_render(_FOLLOW))
        self._create_limited = client.register_script(_charging(_CREATE_LIMITED))
        self._create_many_push = client.register_script(_render(_CREATE_MANY_PUSH))
        self._sweep_queued = client.register_script(_render(_SWEEP_QUEUED))
        self._created = 0

    def _script_batch(self) -> ScriptBatch:
        """Chunks and notes of several jobs in one round trip (tasks/script_batch.py); several jobs'
        transitions are one script call instead (_transitions)."""
        return ScriptBatch(self.redis, (self._append_chunk, self._append_status))

    # -- writes ------------------------------------------------------------------------------
    def _fields(
        self,
        kind: str,
        model_id: str,
        device: str,
        request_id: str | None,
        owner: str | None,
        job_id: str,
        notify: str | None,
        now: float,
        ttl: int | None = None,
        payload: bytes | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        fields = {
            "job_id": job_id,
            "kind": kind,
            "model_id": model_id,
            "status": QUEUED,
            "device": device,
            "created_at": repr(now),
            "attempts": "0",
        }
        if request_id:
            fields["request_id"] = request_id
        if owner:
            fields["owner"] = owner
        if notify:
            fields["notify"] = notify
        if ttl:
            fields["ttl"] = str(int(ttl))  # this job's retention (result_ttl), honoured by every transition
        if payload:
            fields["payload"] = payload  # how to queue it again should its message be lost; dropped as it starts
        if extra:
            fields.update({k: v for k, v in extra.items() if v is not None})  # webhook, replay_of
        return fields

    def create_limited(
        self,
        limits: list[tuple[str, int, int]],
        *,
        kind: str,
        model_id: str,
        device: str,
        request_id: str | None = None,
        owner: str | None = None,
        job_id: str | None = None,
        notify: str | None = None,
        ttl: int | None = None,
        payload: bytes | None = None,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
        idempotency: tuple[str, str, int, str] | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Count the caller against `limits` [(counter key, amount, window seconds)] and create the job, in
        one round trip; raise RateLimited (creating nothing) when a limit is already reached. Returns the job
        and the use of each limit. `idempotency`: (the key's record, the request's fingerprint, retention s, the key's
        owner): a key already used raises IdempotencyConflict (creating nothing, counting nothing); a new one past
        its owner's AETHERCORE_IDEMPOTENCY_MAX_KEYS raises QuotaExceeded (creating nothing)."""
        job_id = job_id or new_job_id()
        now = now or time.time()
        fields = self._fields(kind, model_id, device, request_id, owner, job_id, notify, now, ttl, payload, extra)
        args: list[Any] = [ttl or self.ttl_s, repr(now), job_id, len(limits)]
        for _key, amount, window in limits:
            args += [amount, window]
        max_keys = self.quotas.get(IDEMPOTENCY, Quota()).max_count
        args += [*idempotency[1:], max_keys] if idempotency else ["", "", "", ""]
        for key, value in fields.items():
            args += [key, value]
        keys = [job_key(job_id), RECENT_JOBS, queued_key(device), *(k for k, _a, _w in limits)]
        if idempotency:
            keys.append(idempotency[0])
        reply = self._create_limited(keys=keys, args=args)
        if int(reply[0]) == 0:
            raise RateLimited(int(reply[1]) - 1, int(reply[2]))
        if int(reply[0]) in (2, 3):
            raise IdempotencyConflict(_text(reply[1]), reused=int(reply[0]) == 3)
        if int(reply[0]) == 4 and idempotency:
            raise self.holdings.refusal(idempotency[3], IDEMPOTENCY, int(reply[1]), 0)
        self._trim_recent(now)
        return self._decode(fields), [int(v) for v in reply[1:]]

    def create_and_push(
        self,
        device: str,
        queue_list: str,
        entries: list[dict[str, Any]],
        build_message: Callable[[list[int]], bytes | None],
    ) -> list[tuple[dict[str, Any], list[int]] | RateLimited]:
        """Create queued jobs bound for `device` and push their one broker message onto `queue_list`, in one round
        trip (another only when a job is refused). `entries`: create_limited's arguments (no `idempotency`), each
        with its `limits`; `build_message(indexes)`: the message carrying the entries at those indexes (and any job
        created before), None when it carries nothing. Returns per entry its job and the use of each limit, or the
        RateLimited that refused it (it is in no message)."""
        outcome: list[tuple[dict[str, Any], list[int]] | RateLimited | None] = [None] * len(entries)
        optional = {"request_id": None, "owner": None, "notify": None}  # as create_limited's defaults
        fields = [self._fields(**optional | {k: v for k, v in e.items() if k != "limits"}) for e in entries]
        live = list(range(len(entries)))
        while (message := build_message(live)) is not None:
            keys: list[Any] = [RECENT_JOBS, queued_key(device), queue_list]
            args: list[Any] = [message, len(live)]
            for at in live:
                entry, job = entries[at], fields[at]
                keys.append(job_key(job["job_id"]))
                args += [job["job_id"], job["created_at"], entry.get("ttl") or self.ttl_s, len(entry["limits"])]
                for key, amount, window in entry["limits"]:
                    keys.append(key)
                    args += [amount, window]
                args.append(len(job))
                for key, value in job.items():
                    args += [key, value]
            reply = self._create_many_push(keys=keys, args=args)
            if int(reply[0]) == 1:
                for at, used in zip(live, reply[1]):
                    self._trim_recent(float(fields[at]["created_at"]))
                    outcome[at] = (self._decode(fields[at]), [int(v) for v in used])
                break
            for at, verdict in zip(list(live), reply[1]):
                if verdict:
                    outcome[at] = RateLimited(int(verdict[0]) - 1, int(verdict[1]))
                    live.remove(at)
        return outcome  # type: ignore[return-value]

    def _trim_recent(self, now: float, pipe: Any = None) -> None:
        """Bound the recent-jobs index (by count and by the result TTL), once per TRIM_EVERY creations."""
        self._created += 1
        if self._created % self.TRIM_EVERY != 1:
            return
        target = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        target.zremrangebyrank(RECENT_JOBS, 0, -RECENT_JOBS_MAX - 1)
        target.zremrangebyscore(RECENT_JOBS, "-inf", now - self.ttl_s)
        if pipe is None:
            target.execute()

    def create(self, **fields: Any) -> dict[str, Any]:
        """Write a queued job (one round trip) with no rate limit to count; the arguments of create_limited."""
        return self.create_limited([], **fields)[0]

    def release_key(self, record: str, job_id: str, owner: str) -> None:
        """Free `owner`'s Idempotency-Key record if it still names `job_id` (its creation failed after all)."""
        self._release_key(keys=[record], args=[job_id, owner])

    def recent(self, limit: int = 50, **filters: str) -> list[dict[str, Any]]:
        """Newest first; `filters` match job fields exactly (status, model_id, kind)."""
        found: list[dict[str, Any]] = []
        start, page = 0, 200
        while len(found) < limit and start < RECENT_JOBS_MAX:
            ids = self.redis.zrevrange(RECENT_JOBS, start, start + page - 1)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            for fields in pipe.execute():
                if not fields:
                    continue  # expired
                job = self._decode(fields)
                if all(job.get(k) == v for k, v in filters.items() if v is not None):
                    found.append(job)
                    if len(found) == limit:
                        break
            start += page
        return found

    def mark_running(self, job_id: str, worker: str, payload: bytes) -> int:
        """The job's delivery count (1 the first time), or 0 when it already ended (a redelivery after its
        result was written, or it was cancelled) or a live worker runs it. `payload`: how to queue it again
        (`requeue_payload`), kept in this worker's in-flight hash until the job ends."""
        return self.mark_running_many([(job_id, payload)], worker)[0]

    def mark_running_many(self, jobs: list[tuple[str, bytes]], worker: str) -> list[int]:
        """One round trip for the (job id, payload) pairs of one message: each job's delivery count, 0 if it
        is not to run here."""
        started = repr(time.time())
        calls = [
            (job_id, [RUNNING, str(self.ttl_s), "status", "", worker, payload, "started_at", started, "worker", worker])
            for job_id, payload in jobs
        ]
        return [max(0, int(outcome)) for outcome in self._transitions(calls)]

    def _transitions(self, calls: list[tuple[str, list[Any]]]) -> list[int]:
        """Several jobs' transitions (job id, the transition's ARGV) in one script call (_TRANSITION_MANY)."""
        if not calls:
            return []
        keys: list[str] = []
        args: list[Any] = [len(calls)]
        for job_id, job_args in calls:
            keys += [job_key(job_id), job_events_key(job_id)]
            args += [len(job_args), *job_args]
        outcomes = []
        for (job_id, _), outcome in zip(calls, self._transition_many(keys=keys, args=args)):
            if isinstance(outcome, list):  # [BROKEN, the error]: see _TRANSITION_MANY
                logger.bind(job_id=job_id).error(
                    "job {}'s record breaks its transition ({}); left as it stands", job_id, outcome[1]
                )
                outcome = BROKEN
            outcomes.append(int(outcome))
        return outcomes

    def mark_forward(self, job_ids: list[str], alone: bool) -> None:
        """These running jobs are now in a forward pass, on their own or shared: if the worker dies before
        they end, only a job that was alone is charged a crash (see _REAP)."""
        self.note_forward(job_ids, alone)()

    def note_forward(self, job_ids: list[str], alone: bool) -> Callable[[], Any]:
        """mark_forward, sent without waiting: the note is on Redis's socket when this returns, ahead of the
        pass, and the returned call (made once, after the pass) reads Redis's answer. A lone job at GPU speed
        does not wait a round trip in front of the device."""
        value = "alone" if alone else "shared"
        return send_now_read_later(self.redis, [("HSET", job_key(job_id), "pass", value) for job_id in job_ids])

    def inflight_holders(self) -> list[str]:
        """Workers that may hold in-flight jobs (dead ones included: that is what the reaper looks for)."""
        return [h.decode() if isinstance(h, bytes) else h for h in self.redis.smembers(INFLIGHT_HOLDERS)]

    def inflight(self, worker: str) -> dict[str, bytes]:
        return {
            (k.decode() if isinstance(k, bytes) else k): v for k, v in self.redis.hgetall(inflight_key(worker)).items()
        }

    def reap(self, dead: str) -> list[tuple[str, bytes, int]]:
        """Take the jobs a dead worker was running back to `queued` (see _REAP): (job id, payload, crashes)
        for each; nothing if the worker is alive or another reaper was first."""
        flat = self._reap(args=[dead, repr(time.time())])
        return [(_text(flat[i]), _bytes(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]

    def running_since(self, job_ids: list[str]) -> list[str | None]:
        """Each job's `started_at` as stored (the running try's start, epoch seconds as text), None if gone."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "started_at")
        return [_text(v) if v is not None else None for v in pipe.execute()]

    def reclaim(self, holder: str, job_id: str, started_at: str) -> tuple[bytes, int] | None:
        """Take a job its live holder no longer works on back to `queued` (see _RECLAIM): (payload, crashes), or
        None if it ended, moved or started again meanwhile."""
        reply = self._reclaim(args=[holder, job_id, repr(time.time()), started_at])
        return (_bytes(reply[0]), int(reply[1])) if reply else None

    def sweep_queued(self, queue: str, stale_s: float, limit: int = 100) -> list[tuple[str, bytes]]:
        """Jobs of `queue` whose message is lost (see _SWEEP_QUEUED), claimed for another `stale_s`."""
        lanes = [lane_list(queue, lane) for lane in LANES]  # a message waiting in any lane is not lost
        flat = self._sweep_queued(keys=lanes, args=[queue, repr(time.time()), stale_s, limit])
        return [(_text(flat[i]), _bytes(flat[i + 1])) for i in range(0, len(flat), 2)]

    def finish_many(self, outcomes: list[dict[str, Any]]) -> list[bool]:
        """End several jobs in one round trip; each item: job_id, status, and result (an object, or its
        JSON as `result_json` bytes) or error, and optionally `note`: the JSON object of its ending fields
        (without result and error, which the script adds) for the API processes waiting for the job if it
        ends now. Returns, per job, whether it ended now."""
        calls = [
            (
                item["job_id"],
                self._transition_args(
                    item["status"],
                    "done",
                    self._final_values(item.get("result_json") or item.get("result"), item.get("error")),
                    item.get("note") or b"",
                    item.get("dead"),
                ),
            )
            for item in outcomes
        ]
        return [outcome == 1 for outcome in self._transitions(calls)]

    def finish(self, job_id: str, status: str, *, result: Any = None, error: dict | None = None) -> bool:
        """End the job once; later calls for an ended job change nothing and return False."""
        values = self._final_values(result, error)
        note = encode({"job_id": job_id, "status": status, "finished_at": float(values["finished_at"])})
        outcome = self._call(job_id, status, "done", values, note=note)
        if outcome == -1:
            raise JobNotFound(job_id)
        return outcome == 1

    @staticmethod
    def _final_values(result: Any, error: dict | None) -> dict[str, Any]:
        values: dict[str, Any] = {"finished_at": repr(time.time())}
        if result is not None:
            values["result"] = result if isinstance(result, bytes) else encode(result)
        if error is not None:
            values["error"] = encode(error)
        return values

    def _call(
        self,
        job_id: str,
        status: str,
        event: str,
        values: dict[str, Any],
        note: bytes = b"",
        dead: str | None = None,
    ) -> Any:
        """`dead`: the job becomes a dead letter for this reason if it ends now (tasks/deadletters.py)."""
        args = self._transition_args(status, event, values, note, dead)
        return self._transition(keys=[job_key(job_id), job_events_key(job_id)], args=args)

    def _transition_args(
        self, status: str, event: str, values: dict[str, Any], note: bytes = b"", dead: str | None = None
    ) -> list[Any]:
        """_TRANSITION's ARGV for a transition to `status` writing `values` (see the script)."""
        if event == "done" and status not in TERMINAL:
            raise ValueError(f"{status!r} is not a final status")
        args: list[Any] = [status, str(self.ttl_s), event, note, dead or "", self.dead_letter_spec if dead else ""]
        for key, value in values.items():
            args += [key, value]
        return args

    def watch(self, job_id: str, channel: str) -> dict[str, Any] | None:
        """The job as it stands; if it has not ended, `channel` is told when it does."""
        flat = self._watch(keys=[job_key(job_id)], args=[channel])
        if not flat:
            return None
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in zip(flat[::2], flat[1::2])
        }
        return self._decode(fields)

    def follow(self, job_id: str) -> tuple[str, bool] | None:
        """Mark the job followed (its end goes into its event stream); its status and whether the stream
        exists, or None for an unknown job."""
        reply = self._follow(keys=[job_key(job_id), job_events_key(job_id)])
        return (_text(reply[0]), bool(int(reply[1]))) if reply else None

    def append_chunk(self, job_id: str, index: int, chunk: dict[str, Any]) -> int:
        return int(
            self._append_chunk(keys=[job_key(job_id), job_events_key(job_id)], args=[index, encode(chunk), self.ttl_s])
        )

    def append_chunks(self, chunks: list[tuple[str, int, dict[str, Any]]]) -> list[int]:
        """Append (job_id, index, chunk) items in one round trip; one outcome (CHUNK_*) per item, in order."""
        pipe = self._script_batch()
        for job_id, index, chunk in chunks:
            self._append_chunk(
                keys=[job_key(job_id), job_events_key(job_id)], args=[index, encode(chunk), self.ttl_s], client=pipe
            )
        return [int(outcome) for outcome in pipe.execute()]

    def append_status(self, job_ids: list[str], status: dict[str, Any]) -> None:
        """Add a status note to the streams of these running jobs, in one round trip."""
        pipe = self._script_batch()
        for job_id in job_ids:
            self._append_status(
                keys=[job_key(job_id), job_events_key(job_id)], args=[encode(status), self.ttl_s], client=pipe
            )
        pipe.execute()

    def request_cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop; False if it already ended."""
        outcome = int(self._request_cancel(keys=[job_key(job_id)]))
        if outcome == -1:
            raise JobNotFound(job_id)
        if outcome == 2:
            ended = self.finish(job_id, CANCELLED, error=error_body(CANCELLED_CODE, reason))
            return ended or self.request_cancel(job_id, reason)  # it started meanwhile: ask it to stop
        return outcome == 1

    def events(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Events after `last_id` ('0-0': from the start), blocking up to `block_ms` for the first."""
        reply = self.redis.xread({job_events_key(job_id): last_id}, block=max(1, block_ms), count=500)
        return [entry for _stream, entries in (reply or []) for entry in entries]

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(job_key(job_id))
        return self._decode(fields) if fields else None

    def get_many(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """Several jobs in one round trip, in order (None for one that is gone)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [self._decode(fields) if fields else None for fields in pipe.execute()]

    @staticmethod
    def _decode(fields: dict[str, str]) -> dict[str, Any]:
        def ts(name: str) -> float | None:
            return float(fields[name]) if fields.get(name) else None

        def js(name: str) -> Any:
            return orjson.loads(fields[name]) if fields.get(name) else None

        created, started, finished = ts("created_at"), ts("started_at"), ts("finished_at")
        job = {
            "job_id": fields["job_id"],
            "kind": fields.get("kind"),
            "model_id": fields.get("model_id"),
            "status": fields.get("status"),
            "device": fields.get("device"),
            "worker": fields.get("worker"),
            "attempts": int(fields.get("attempts") or 0),
            "request_id": fields.get("request_id"),
            "owner": fields.get("owner"),
            "chunks": int(fields.get("chunks") or 0),
            "created_at": iso(created),
            "started_at": iso(started),
            "finished_at": iso(finished),
            "result": expand(js("result")),
            "error": js("error"),
            "_created_ts": created,
        }
        if "replay_of" in fields:  # a dead letter's replay (api/blueprints/dead_letters.py)
            job["replay_of"] = fields["replay_of"]
        return job
