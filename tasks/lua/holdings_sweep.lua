-- ARGV: now, limit. Takes at most `limit` expired objects out of the accounts, then adds every account up again
-- into the total (so nothing an account lost with its keys stays counted there) and forgets owners who hold nothing.
-- Returns the objects taken out.
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local owners = redis.call('ZRANGE', HOLD_OWNERS, 0, -1)
local taken = 0
for _, owner in ipairs(owners) do
  for _, kind in ipairs(HOLDINGS_KINDS) do
    taken = taken + hold_prune(owner, kind, now, limit - taken)
  end
end
local sums = {}
for _, owner in ipairs(owners) do
  local fields = redis.call('HGETALL', HOLD_PREFIX .. owner)
  for i = 1, #fields, 2 do
    sums[fields[i]] = (sums[fields[i]] or 0) + tonumber(fields[i + 1])
    if string.sub(fields[i], -6) == '.bytes' then sums['bytes'] = (sums['bytes'] or 0) + tonumber(fields[i + 1]) end
  end
end
redis.call('DEL', HOLD_TOTAL)
for name, value in pairs(sums) do redis.call('HSET', HOLD_TOTAL, name, value) end
redis.call('ZREMRANGEBYSCORE', HOLD_OWNERS, '-inf', now)
return taken
