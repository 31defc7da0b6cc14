-- Take the next lines. KEYS: batch, jobs. ARGV: limit, mode ('room': while fewer than `limit` lines are taken and
-- the batch runs normally; 'all': up to `limit` more, the batch stopping), ttl. Returns {first line, count}.
local stopping = redis.call('HGET', KEYS[1], 'stopping')
local count
if ARGV[2] == 'room' then
  if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' or stopping then return {0, 0} end
  count = tonumber(ARGV[1]) - redis.call('HLEN', KEYS[2])
else
  if not stopping then return {0, 0} end
  count = tonumber(ARGV[1])
end
local first = tonumber(redis.call('HGET', KEYS[1], 'next_line') or '0')
count = math.min(count, tonumber(redis.call('HGET', KEYS[1], 'total') or '0') - first)
if count <= 0 then return {first, 0} end
for line = first, first + count - 1 do redis.call('HSET', KEYS[2], line, '-') end
redis.call('HSET', KEYS[1], 'next_line', first + count)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {first, count}
