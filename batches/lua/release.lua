-- The leases a stopping driver still holds, given up (another driver takes the batches at once, not after the
-- lease's TTL). KEYS: leases. ARGV: holder.
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); released = released + 1 end
end
return released
