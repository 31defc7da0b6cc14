-- Failed for good: kept (and charged) `keep` seconds and listed; the failed index is trimmed to what is kept.
-- ARGV: id, token, now, breaker failures, cool-down, verdict, reason, error, attempts, keep.
local id, token, now, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[10])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
local owner = owner_of(key)
release(key, id, owner, ARGV[6], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', key, 'state', 'failed', 'reason', ARGV[7], 'last_error', ARGV[8], 'failed_at', ARGV[3],
  'attempts', ARGV[9])
redis.call('HDEL', key, 'held')
redis.call('EXPIRE', key, keep)
redis.call('ZADD', '$FAILED', now, id)
redis.call('ZREMRANGEBYSCORE', '$FAILED', '-inf', now - keep)
if owner ~= '' then hold_renew(owner, '$KIND', id, now + keep, now) end
return 1
