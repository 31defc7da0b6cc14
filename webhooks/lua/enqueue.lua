-- A delivery due now, written by Python (a batch's end; a job's end writes it in its own Lua step), charged to its
-- owner with force (bounded at admission: AETHERCORE_WEBHOOK_MAX_PENDING). ARGV: id, kind, ref, webhook, event,
-- queue, body ('' for none), has body, now.
local id, now = ARGV[1], tonumber(ARGV[9])
local key = '$DELIVERY' .. id
redis.call('HSET', key, 'kind', ARGV[2], 'ref', ARGV[3], 'webhook', ARGV[4], 'event', ARGV[5], 'queue', ARGV[6])
if ARGV[8] == '1' then redis.call('HSET', key, 'body', ARGV[7]) end
redis.call('EXPIRE', key, $KEEP_DELIVERY_S)
redis.call('ZADD', '$DUE', 'NX', 0, id)
local owner = owner_of(key)
if owner ~= '' then hold_put(owner, '$KIND', id, #ARGV[7], now + $KEEP_DELIVERY_S, now, 0, 0, 0, true) end
return 1
