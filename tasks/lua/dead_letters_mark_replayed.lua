-- KEYS: the entry. ARGV: the new job's id.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'replayed_as', ARGV[1])
return 1
