-- ARGV: job id, queue, reason, limits, owner, then field/value pairs.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
dead_put(ARGV[1], ARGV[2], ARGV[3], now, ARGV[5], ARGV[4], {unpack(ARGV, 6)})
return 1
