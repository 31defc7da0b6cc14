-- A running job whose live holder has stopped working on it (workers/reaper.py decides that from the holder's
-- published active jobs), taken back to `queued` like a dead worker's job, with a crash charged: whatever
-- dropped it may do so again, and AETHERCORE_MAX_ATTEMPTS bounds how often. Only if it is still running on that
-- holder, still in its in-flight hash, and was not started again since the reaper looked (started_at).
-- ARGV: holder, job id, now, the started_at the reaper saw. Returns {payload, crashes}, or nothing.

local key = '$JOB_PREFIX' .. ARGV[2]
local payload = redis.call('HGET', '$INFLIGHT_PREFIX' .. ARGV[1], ARGV[2])
if not payload then return nil end
if redis.call('HGET', key, 'status') ~= $RUNNING or redis.call('HGET', key, 'holder') ~= ARGV[1]
   or redis.call('HGET', key, 'started_at') ~= ARGV[4] then
  return nil
end
redis.call('HDEL', '$INFLIGHT_PREFIX' .. ARGV[1], ARGV[2])
local crashes = redis.call('HINCRBY', key, 'crashes', 1)
redis.call('HDEL', key, 'pass', 'holder')
redis.call('HSET', key, 'status', $QUEUED, 'payload', payload)
redis.call('ZADD', '$QUEUED_PREFIX' .. redis.call('HGET', key, 'device'), ARGV[3], ARGV[2])
return {payload, crashes}
