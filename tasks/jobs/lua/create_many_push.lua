-- Create several queued jobs bound for one queue and push the one broker message that carries them, in one step:
-- the API's flat-combined submissions (submission/dispatch.py) pay one round trip for all of them, and a job exists exactly
-- when its message is queued. KEYS: recent-jobs index, the queue's index of unstarted jobs, the broker list, then per
-- job: its key and one counter per limit. ARGV: the message, the number of jobs, then per job: job id, now, ttl,
-- number of limits n, (amount, window seconds) x n, number of field/value pairs m, the pairs. Every limit is checked
-- first, the jobs before it in this call counted: any job over a limit -> {0, {limit index, ms until its window
-- ends} or {} per job}, and nothing is written (the caller leaves the refused ones out and calls again).
-- Else {1, {used...} per job}.

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
  redis.call('EXPIRE', job.key, math.max(job.ttl, $KEEP_UNFINISHED_S))
  redis.call('ZADD', KEYS[1], job.now, job.id)
  redis.call('ZADD', KEYS[2], job.now, job.id)
  reply[j] = used
end
redis.call('LPUSH', KEYS[3], ARGV[1])
return {1, reply}
