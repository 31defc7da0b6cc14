-- Another attempt at `at`. ARGV: id, token, now, breaker failures, cool-down, verdict, at, attempts, error.
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
release(key, id, owner_of(key), ARGV[6], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', key, 'attempts', ARGV[8], 'last_error', ARGV[9], 'next_at', ARGV[7])
redis.call('ZADD', '$DUE', ARGV[7], id)
return 1
