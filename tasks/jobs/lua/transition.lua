-- A job's transitions: `running` (a worker takes it) and its end (`done`), for one job or several in one call
-- (tasks/jobs/lifecycle.py). Rendered with tasks/jobs/scripts.py `render`, after tasks/deadletters.py's writer
-- (dead_put, dead_request) and tasks/holdings.py's functions (hold_put).
--
-- KEYS: each job's two keys (its hash, its event stream). ARGV: the number of jobs, then per job the number of its
-- arguments and the arguments (A below): status, ttl, event ('status' | 'done'), wake note ('' for none), holder,
-- payload, then field/value pairs. For a `done` transition the 5th and 6th are instead the dead-letter reason
-- ('' for none) and the dead letters' bounds (tasks/deadletters.py limits_arg). Returns each job's outcome: the
-- delivery count for `running`, 1 ended now, 0 not (already ended, or running on another live worker), -1 no such
-- job, {$BROKEN, the error} for a job whose record breaks its step.
--
-- `running`: the worker named `holder` takes the job, and `payload` (how to queue it again) goes into that
-- worker's in-flight hash, which the reaper requeues from if the worker dies. A job running on another
-- worker that is still alive is not taken (a second copy of its message: the broker redelivered it, or
-- the reaper requeued it from a worker only thought dead) -> 0, like a job that already ended.
-- A `done` transition removes the job from its holder's in-flight hash and hands the note — a JSON
-- object of the job's ending fields, completed here with the `result` and `error` values being written, so
-- the result crosses the wire once — to every reply channel in the job's `notify` (the API processes
-- waiting for it), in the same step: only a job that really ended wakes anyone. The notes go out as ONE message
-- per reply channel, a JSON array: an API process waiting for a whole batch is woken by one message, not one per
-- job (each cost its reply listener a pubsub read and a decode, and Redis a PUBLISH).

local notes, channels = {}, {}
local function wake(channel, note)
  if not notes[channel] then notes[channel] = {}; table.insert(channels, channel) end
  table.insert(notes[channel], note)
end

local function clock()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
-- Whom a job's delivery is charged to: its webhook's owner ({url, owner}), else the job's.
local function hook_owner(hook, job)
  local ok, decoded = pcall(cjson.decode, hook)
  if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then return decoded.owner end
  return redis.call('HGET', job, 'owner') or '$NO_OWNER'
end
-- The step for one job, a function of its keys (K) and arguments (A).
local function transition(K, A)
local current = redis.call('HGET', K[1], 'status')
if not current then return -1 end
if $IS_TERMINAL(current) then
  return 0
end
local job_id = string.sub(K[1], $JOB_PREFIX_LEN + 1)
local holder = redis.call('HGET', K[1], 'holder')
local ttl = redis.call('HGET', K[1], 'ttl') or A[2]  -- the job's own retention, if it asked for one
-- A dead letter keeps what it takes to run the job again: its payload, before it leaves the job or the in-flight hash.
local replay = ''
if A[3] == 'done' and A[5] ~= '' then
  replay = redis.call('HGET', K[1], 'payload')
    or (holder and redis.call('HGET', '$INFLIGHT_PREFIX' .. holder, job_id)) or ''
end
if A[1] == $RUNNING then
  if current ~= $QUEUED and current ~= $RUNNING then return 0 end
  if current == $RUNNING and holder and redis.call('EXISTS', '$WORKER_PREFIX' .. holder) == 1 then return 0 end
end
if current == $QUEUED then  -- it leaves the queue: no longer a candidate for re-queueing
  redis.call('ZREM', '$QUEUED_PREFIX' .. redis.call('HGET', K[1], 'device'), job_id)
  redis.call('HDEL', K[1], 'payload')
end
if A[1] == $RUNNING then
  if holder and holder ~= A[5] then redis.call('HDEL', '$INFLIGHT_PREFIX' .. holder, job_id) end
  redis.call('HDEL', K[1], 'pass')
  redis.call('HSET', K[1], 'status', $RUNNING, 'holder', A[5], unpack(A, 7))
  redis.call('HSET', '$INFLIGHT_PREFIX' .. A[5], job_id, A[6])
  redis.call('SADD', '$INFLIGHT_HOLDERS', A[5])
  local attempts = redis.call('HINCRBY', K[1], 'attempts', 1)
  -- Kept while it runs even if its own retention is shorter (the retention counts from its end).
  redis.call('EXPIRE', K[1], math.max(tonumber(ttl), $KEEP_UNFINISHED_S))
  return attempts
end
redis.call('HSET', K[1], 'status', A[1], unpack(A, 7))
if A[3] == 'done' then
  if holder then
    redis.call('HDEL', '$INFLIGHT_PREFIX' .. holder, job_id)
    redis.call('HDEL', K[1], 'holder')
  end
  -- A job nobody follows that streamed nothing has no event stream: its `done` would cost ~4.7 KB of Redis
  -- (a stream's first node) for no reader. A follower marks the job `followed` first (follow.lua).
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
  if hook then  -- its webhook delivery is due, durably, in the step that ends it (webhooks/deliveries.py)
    local id = '$DELIVERY_ID_PREFIX' .. job_id
    local queue = redis.call('HGET', K[1], 'device') or ''
    redis.call('HSET', '$WEBHOOK_DELIVERY_PREFIX' .. id, 'kind', 'job', 'ref', job_id, 'webhook', hook, 'event', A[1],
      'queue', queue)
    redis.call('EXPIRE', '$WEBHOOK_DELIVERY_PREFIX' .. id, $KEEP_DELIVERY_S)
    redis.call('ZADD', '$WEBHOOKS_DUE', 'NX', 0, id)
    -- charged to the webhook's owner until the dispatcher ends it (force: bounded when the request is admitted)
    local now = clock()
    hold_put(hook_owner(hook, K[1]), '$DELIVERIES_KIND', id, $DELIVERY_OVERHEAD + #hook + #queue, now + $KEEP_DELIVERY_S,
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
