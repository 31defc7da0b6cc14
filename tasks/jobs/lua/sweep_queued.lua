-- Jobs of one queue that have waited STALE seconds or more while the queue itself is empty (every priority lane's
-- list, KEYS): their message is gone (a worker killed between taking it from the broker and starting it, or, for a
-- job created before its message is sent — an Idempotency-Key, a broker of its own — an API process killed between
-- the two). Each is claimed for another STALE seconds (so several sweepers queue it once) and returned with its
-- payload. ARGV: queue, now, stale seconds, limit. Returns job id, payload per job found.

for _, list in ipairs(KEYS) do
  if redis.call('LLEN', list) > 0 then return {} end
end
local index = '$QUEUED_PREFIX' .. ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]), 'LIMIT', 0, ARGV[4])
local found = {}
for _, id in ipairs(ids) do
  local key = '$JOB_PREFIX' .. id
  local payload = redis.call('HGET', key, 'payload')
  if redis.call('HGET', key, 'status') == $QUEUED and payload then
    redis.call('ZADD', index, ARGV[2], id)
    table.insert(found, id); table.insert(found, payload)
  else
    redis.call('ZREM', index, id)  -- started, ended or expired meanwhile
  end
end
return found
