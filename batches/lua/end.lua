-- The end of a batch whose every line is answered (or, forced, of one whose deadline passed): the status (only
-- from those named), then, when it ends here, it leaves the active sets, its input file is released, its record is
-- charged again with its error list and the retention's expiry, its files' charges get that expiry too, and its
-- webhook's delivery is due (webhooks/deliveries.py), in this same step: a process that dies after it loses nothing.
-- KEYS: batch, jobs, active, owner's active, input file fields. ARGV: from, to, time field, now, retention, batch
-- id, 1 = it ends here (0: only the status), 1 = forced, then field/value pairs. Returns '' done, 'busy' lines are
-- still unanswered, or the status it found.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. status .. ' ', 1, true) then return status end
if ARGV[8] ~= '1' then
  local answered = tonumber(redis.call('HGET', KEYS[1], 'completed') or '0')
    + tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
  if redis.call('HLEN', KEYS[2]) > 0 or answered < tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then
    return 'busy'
  end
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
if ARGV[7] ~= '1' then return '' end
redis.call('SREM', KEYS[3], ARGV[6])
redis.call('SREM', KEYS[4], ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if tonumber(redis.call('HGET', KEYS[5], 'in_use') or '0') > 0 then redis.call('HINCRBY', KEYS[5], 'in_use', -1) end
local now = tonumber(ARGV[4])
local kept_until = now + tonumber(ARGV[5])
local info = redis.call('HMGET', KEYS[1], 'owner', 'output_file', 'error_file', 'webhook')
local owner, size = info[1], record_size(KEYS[1])
hold_put(owner, '$BATCHES', ARGV[6], size, kept_until, now, 0, 0, 0, true)
for i = 2, 3 do
  if info[i] then hold_renew(owner, '$OUTPUTS', info[i], kept_until, now) end
end
if info[4] then
  local id = '$DELIVERY_ID_PREFIX' .. ARGV[6]
  local delivery = '$DELIVERY_PREFIX' .. id
  redis.call('HSET', delivery, 'kind', '$DELIVERY_KIND', 'ref', ARGV[6], 'webhook', info[4],
    'event', 'batch.' .. ARGV[2], 'queue', '')
  redis.call('EXPIRE', delivery, $KEEP_DELIVERY_S)
  redis.call('ZADD', '$WEBHOOKS_DUE', 'NX', 0, id)
  -- forced: a batch's end cannot be refused; one delivery per batch, bounded by the batches kept
  hold_put(owner, '$DELIVERIES', id, size + $DELIVERY_OVERHEAD, now + $KEEP_DELIVERY_S, now, 0, 0, 0, true)
end
return ''
