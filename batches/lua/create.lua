-- KEYS: batch, input file fields, input file lines, active, owner's active, owner's index, every batch's index.
-- ARGV: batch id, its index score (creation time), most active per owner, batch ttl, the input's least ttl, index
-- trim before, index ttl, owner, now, when the record expires, most batches kept per owner, the share of Redis all
-- holdings may take (bytes), then the batch's field/value pairs. Returns CREATED, NO_FILE, TOO_MANY_ACTIVE or the
-- account's refusal: the record is charged (kind BATCHES) in the step that writes it.
if redis.call('EXISTS', KEYS[2]) == 0 then return $NO_FILE end
-- a batch whose record is gone (it expired, or Redis lost it) holds none of its owner's slots any more
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('EXISTS', '$BATCH_PREFIX' .. id) == 0 then
    redis.call('SREM', KEYS[5], id)
    redis.call('SREM', KEYS[4], id)
  end
end
if redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[3]) then return $TOO_MANY_ACTIVE end
local size = $RECORD_OVERHEAD
for i = 13, #ARGV do size = size + #ARGV[i] end
local charged = hold_put(ARGV[8], '$BATCHES', ARGV[1], size, ARGV[10], ARGV[9], 0, ARGV[11], ARGV[12], false)
if charged < 0 then return charged end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[2], 'in_use', 1)
for i = 2, 3 do
  local ttl = redis.call('TTL', KEYS[i])
  if ttl >= 0 and ttl < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[4])
for i = 6, 7 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[6])
  redis.call('EXPIRE', KEYS[i], ARGV[7])
end
return $CREATED
