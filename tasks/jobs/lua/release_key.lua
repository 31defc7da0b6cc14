-- An Idempotency-Key whose job could not be queued is freed (only if it still names that job), and leaves its
-- owner's account: a failed creation does not hold the key. KEYS: the key's record. ARGV: job id, the key's owner.
-- Returns 1 freed, 0 not (it names another job, or is gone).

local held = redis.call('GET', KEYS[1])
if held and string.sub(held, -string.len(ARGV[1])) == ARGV[1] then
  hold_drop(ARGV[2], '$IDEMPOTENCY_KIND', KEYS[1])
  return redis.call('DEL', KEYS[1])
end
return 0
