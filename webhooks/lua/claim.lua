-- Claim due deliveries for one dispatcher's free threads. Leases that lapsed (their dispatcher died) are due again.
-- Then up to `scan` due deliveries are looked at, oldest first, and up to `limit` claimed; each one that may not
-- start now is held back, rescheduled without taking a thread and without counting an attempt:
--   its endpoint's circuit is open           -> until the cool-down ends
--   half-open with its probe in flight, or its endpoint or owner at its cap
--                                             -> HOLD_FIRST_S, doubling per hold, at most hold_max
-- The retry window runs from the first attempt or the first hold; a delivery whose window ends while held back is
-- claimed as EXPIRE (failed for good, not sent). In a half-open circuit the one delivery claimed is its probe.
-- ARGV: now, lease end, limit, token, scan, endpoint max, owner max, breaker failures, window, hold max.
-- Returns {id, mode, id, mode, ...} and how many were held back.
local now, lease_end, limit, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local scan, endpoint_max, owner_max = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local failures_max, window, hold_max = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local keep = math.ceil(lease_end - now) + 1
for _, id in ipairs(redis.call('ZRANGEBYSCORE', '$LEASED', '-inf', now, 'LIMIT', 0, scan)) do
  redis.call('ZREM', '$LEASED', id)
  redis.call('ZADD', '$DUE', now, id)
end
local live = {}
local function full(key, max)
  if live[key] == nil then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    live[key] = redis.call('ZCARD', key)
  end
  return live[key] >= max
end
local function take(key, id)
  redis.call('ZADD', key, lease_end, id)
  redis.call('EXPIRE', key, keep)
  live[key] = (live[key] or 0) + 1
end
local claimed, held = {}, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', '$DUE', '-inf', now, 'LIMIT', 0, scan)) do
  if #claimed >= 2 * limit then break end
  local key = '$DELIVERY' .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', '$DUE', id)  -- delivered or expired meanwhile: nothing left to send
  else
    local owner, hook = owner_of(key)
    local endpoint = endpoint_of(owner, tostring(hook.url or ''))
    local state = redis.call('HMGET', '$ENDPOINT' .. endpoint, 'failures', 'open_until', 'probe_until')
    local open_until = tonumber(state[2] or '0')
    local half_open = tonumber(state[1] or '0') >= failures_max and open_until <= now
    local wait = nil
    if open_until > now then
      wait = open_until - now
    elseif (half_open and tonumber(state[3] or '0') > now) or full('$ENDPOINT_LEASES' .. endpoint, endpoint_max)
        or full('$OWNER_LEASES' .. owner, owner_max) then
      wait = math.min(hold_max, $HOLD_FIRST_S * 2 ^ tonumber(redis.call('HGET', key, 'held') or '0'))
    end
    local mode = '$SEND'
    if wait then
      local first = tonumber(redis.call('HGET', key, 'first_at') or '0')
      if first == 0 then
        first = now
        redis.call('HSET', key, 'first_at', ARGV[1])
      end
      if now < first + window then
        redis.call('ZADD', '$DUE', math.min(now + wait, first + window), id)
        redis.call('HINCRBY', key, 'held', 1)
        held = held + 1
        mode = nil
      else
        mode = '$EXPIRE'
      end
    end
    if mode then
      redis.call('ZREM', '$DUE', id)
      redis.call('ZADD', '$LEASED', lease_end, id)
      redis.call('HSET', key, 'lease', token)
      if mode == '$SEND' then
        redis.call('HSET', key, 'endpoint', endpoint)
        redis.call('HDEL', key, 'held')
        take('$ENDPOINT_LEASES' .. endpoint, id)
        take('$OWNER_LEASES' .. owner, id)
        if half_open then redis.call('HSET', '$ENDPOINT' .. endpoint, 'probe', id, 'probe_until', lease_end) end
      end
      table.insert(claimed, id)
      table.insert(claimed, mode)
    end
  end
end
return {claimed, held}
