-- Add a reply channel (ARGV[1]) to a job (KEYS[1]) that has not ended yet, and return the job's fields: one atomic
-- step, so either the caller sees the job ended or the worker that ends it sees the channel. Nothing for an unknown
-- job.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if not $IS_TERMINAL(status) then
  local notify = redis.call('HGET', KEYS[1], 'notify') or ''
  if not string.find(',' .. notify .. ',', ',' .. ARGV[1] .. ',', 1, true) then
    if notify == '' then notify = ARGV[1] else notify = notify .. ',' .. ARGV[1] end
    redis.call('HSET', KEYS[1], 'notify', notify)
  end
end
return redis.call('HGETALL', KEYS[1])
