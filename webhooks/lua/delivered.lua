-- Delivered: the delivery, its lease and its charge are gone. ARGV: id, token, now, breaker failures, cool-down.
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
local owner = owner_of(key)
release(key, id, owner, '$ANSWERED', now, tonumber(ARGV[4]), tonumber(ARGV[5]))
if owner ~= '' then hold_drop(owner, '$KIND', id) end
redis.call('DEL', key)
return 1
