-- The first attempt: the body is kept (every retry sends the same bytes), the window starts, and the delivery's
-- charge is its body's size. ARGV: id, token, body, event, now. Returns 1, or 0 if the claim lost the delivery.
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[5])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
redis.call('HSET', key, 'body', ARGV[3], 'event', ARGV[4])
redis.call('HSETNX', key, 'first_at', ARGV[5])
local owner = owner_of(key)
local ttl = redis.call('TTL', key)
if owner ~= '' and ttl > 0 then hold_put(owner, '$KIND', id, #ARGV[3], now + ttl, now, 0, 0, 0, true) end
return 1
