-- Create a job unless the caller is over a rate limit: the limit's counters and the job record in one
-- round trip. KEYS: job, recent-jobs index, the queue's index of unstarted jobs, one counter per limit, then the
-- Idempotency-Key's record when the request carries one. ARGV: ttl, now, job id, number of limits, (amount, window
-- seconds) per limit, the request's fingerprint, the key's retention, the key's owner and the most keys it may hold
-- ('' '' '' '' without a key), then the job's field/value pairs. Returns {1, used...} created, {0, limit index, ms
-- until that window ends} refused, {4, holdings refusal} for a new key past its owner's quota, or, for a key already
-- used: {2, job id} (the same request: that job, if it is still kept) or {3, job id} (another request).
-- The key is taken (and charged to its owner, tasks/holdings.py IDEMPOTENCY) in the same step as the job is created:
-- two requests with one key create one job, a request refused here (rate limit, quota) leaves the key free, and a
-- replay of a key already held is never refused.

local n = tonumber(ARGV[4])
local idem = KEYS[4 + n]
local fingerprint, key_ttl, key_owner = ARGV[5 + 2 * n], ARGV[6 + 2 * n], ARGV[7 + 2 * n]
if idem then
  local held = redis.call('GET', idem)
  if held then
    local kept, job = string.match(held, '^(%S+) (%S+)$')
    if kept ~= fingerprint then return {3, job or ''} end
    if job and redis.call('EXISTS', '$JOB_PREFIX' .. job) == 1 then return {2, job} end
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
  local charged = hold_put(key_owner, '$IDEMPOTENCY_KIND', idem, $KEY_OVERHEAD + #idem + #record,
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
redis.call('EXPIRE', KEYS[1], math.max(tonumber(ARGV[1]), $KEEP_UNFINISHED_S))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return reply
