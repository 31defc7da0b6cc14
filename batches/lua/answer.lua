-- A line's answer, exactly once, charged to the batch's owner (kind OUTPUTS, the file's id) within the batch's cap
-- (`stored_bytes`: what its two files hold) and the owner's quota; an answer that does not fit is replaced by its
-- short entry in the error file (`output_limit_reached`), charged whatever the totals: bounded by the line count.
-- KEYS: batch, jobs, output lines, error lines. ARGV: line, 'out' | 'err', the line's text, its size as read, input
-- tokens, output tokens, ttl, the short entry, its size as read, now, when the charge expires, the batch's cap, the
-- owner's quota, the share of Redis all holdings may take (0: no limit for the last three). Returns 1 answered
-- now, 2 answered with the short entry, 0 it had an answer.
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
local now = tonumber(ARGV[10])
local function charge(owner, file_id, size, force)
  local done = hold_grow(owner, '$OUTPUTS', file_id, size, now, ARGV[13], ARGV[14], force)
  if done == 0 then
    done = hold_put(owner, '$OUTPUTS', file_id, size, ARGV[11], now, ARGV[13], 0, ARGV[14], force)
  end
  return done
end
local info = redis.call('HMGET', KEYS[1], 'owner', 'output_file', 'error_file', 'stored_bytes')
local text, read, out, outcome = ARGV[3], ARGV[4], ARGV[2] == 'out', 1
local cap = tonumber(ARGV[12])
local fits = cap <= 0 or tonumber(info[4] or '0') + #text <= cap
if fits then
  local file_id = info[3]
  if out then file_id = info[2] end
  fits = charge(info[1], file_id, #text, false) == 1
end
if not fits then
  text, read, out, outcome = ARGV[8], ARGV[9], false, 2
  charge(info[1], info[3], #text, true)
end
local target, count, size = KEYS[4], 'failed', 'error_bytes'
if out then target, count, size = KEYS[3], 'completed', 'output_bytes' end
redis.call('HSET', target, ARGV[1], text)
redis.call('EXPIRE', target, ARGV[7])
redis.call('HINCRBY', KEYS[1], count, 1)
redis.call('HINCRBY', KEYS[1], size, read)
redis.call('HINCRBY', KEYS[1], 'stored_bytes', #text)
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[6]) end
redis.call('HDEL', KEYS[1], 'failures:' .. ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return outcome
