-- A status change, only from the statuses named. KEYS: batch. ARGV: from (space-separated), to, the time field
-- ('' for none), now, then field/value pairs. Returns '' done, or the status it found.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. status .. ' ', 1, true) then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
return ''
