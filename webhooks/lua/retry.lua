-- A failed delivery due again (`manage.py webhooks retry`): only one that failed for good and is still kept; its
-- charge lasts as long as it is kept again, and its endpoint's circuit is closed (whoever retries it says the receiver
-- is back). ARGV: id, keep, now. Returns 1, or 0 if it is not a failed delivery.
local id, keep, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if redis.call('ZSCORE', '$FAILED', id) == false or redis.call('EXISTS', key) == 0 then return 0 end
redis.call('ZREM', '$FAILED', id)
redis.call('HDEL', key, 'state', 'reason', 'failed_at', 'first_at', 'next_at')
redis.call('HINCRBY', key, 'retried', 1)
redis.call('EXPIRE', key, keep)
redis.call('ZADD', '$DUE', 0, id)
local owner, hook = owner_of(key)
redis.call('DEL', '$ENDPOINT' .. endpoint_of(owner, tostring(hook.url or '')))
if owner ~= '' then hold_renew(owner, '$KIND', id, now + keep, now) end
return 1
