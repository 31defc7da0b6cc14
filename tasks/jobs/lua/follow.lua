-- A reader is about to follow the job's event stream (KEYS: the job, its stream): from now on its end is written
-- there even if it streams nothing. Returns {status, whether the stream exists}, or nothing for an unknown job.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
redis.call('HSET', KEYS[1], 'followed', '1')
return {status, redis.call('EXISTS', KEYS[2])}
