-- A streamed chunk is appended once: an index below the count already published (a redelivered job generating
-- again) is skipped. KEYS: the job, its stream. ARGV: the chunk's index, its JSON, the retention to use when the job
-- has none of its own. Returns 1 appended, 0 skipped, -1 job not running, -2 cancel requested.

local status = redis.call('HGET', KEYS[1], 'status')
if status ~= $RUNNING then return -1 end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return -2 end
local published = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '0')
if tonumber(ARGV[1]) < published then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', 'chunk', 'index', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[1], 'chunks', tonumber(ARGV[1]) + 1)
redis.call('EXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'ttl') or ARGV[3])
return 1
