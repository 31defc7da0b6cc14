-- A dead worker's in-flight jobs, taken over by the reaper in one atomic step (so two reapers never both
-- take them): every job it was running goes back to `queued`, with its payload and in its queue's index of
-- unstarted jobs again (so should the reaper die before it publishes them, or the message be lost, the
-- sweep of stale queued jobs finds them). A job that was in a forward pass of its own when its worker died
-- (`pass` = 'alone', written by the worker as it hands the pass to the model) is charged a crash: it may be
-- what killed it. Jobs in a shared pass, or not yet in one, are not. ARGV: dead worker, now.
-- Returns job id, payload, crashes per job taken (nothing while the worker is alive).

if redis.call('EXISTS', '$WORKER_PREFIX' .. ARGV[1]) == 1 then return {} end
local entries = redis.call('HGETALL', '$INFLIGHT_PREFIX' .. ARGV[1])
redis.call('DEL', '$INFLIGHT_PREFIX' .. ARGV[1])
redis.call('SREM', '$INFLIGHT_HOLDERS', ARGV[1])
local taken = {}
for i = 1, #entries, 2 do
  local key = '$JOB_PREFIX' .. entries[i]
  if redis.call('HGET', key, 'status') == $RUNNING and redis.call('HGET', key, 'holder') == ARGV[1] then
    local crashes = tonumber(redis.call('HGET', key, 'crashes') or '0')
    if redis.call('HGET', key, 'pass') == 'alone' then crashes = redis.call('HINCRBY', key, 'crashes', 1) end
    redis.call('HDEL', key, 'pass', 'holder')
    redis.call('HSET', key, 'status', $QUEUED, 'payload', entries[i + 1])
    redis.call('ZADD', '$QUEUED_PREFIX' .. redis.call('HGET', key, 'device'), ARGV[2], entries[i])
    table.insert(taken, entries[i]); table.insert(taken, entries[i + 1]); table.insert(taken, crashes)
  end
end
return taken
