-- Cancel (KEYS: the job): a queued job ends at once (it will never run: 2, and the caller ends it), a running one is
-- asked to stop (1: `cancel_requested`, which its worker reads with each chunk). 0 ended already, -1 no such job.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == $QUEUED then return 2 end
if status == $RUNNING then redis.call('HSET', KEYS[1], 'cancel_requested', '1'); return 1 end
return 0
