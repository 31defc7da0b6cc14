-- A taken line's job, noted only if the line still waits for one. KEYS: jobs. ARGV: line, job id.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= '-' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
