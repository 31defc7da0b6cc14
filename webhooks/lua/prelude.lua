-- Shared by the scripts below. An endpoint is the owner's scheme://host:port: one owner's failing receiver never
-- opens the circuit of another owner's on the same host, and a caller cannot dodge the per-endpoint cap with paths.
-- Slots are leases (sorted sets: delivery id -> lease end), so a dispatcher that dies frees them when they lapse.
local function endpoint_of(owner, url)
  local scheme, authority = string.match(url, '^(%a+)://([^/?#]*)')
  if not scheme then return owner .. ' ' .. url end
  scheme, authority = string.lower(scheme), string.lower(authority)
  if not string.find(authority, ':%d+$') then
    if scheme == 'https' then authority = authority .. ':443' else authority = authority .. ':80' end
  end
  return owner .. ' ' .. scheme .. '://' .. authority
end
local function owner_of(key)
  local ok, hook = pcall(cjson.decode, redis.call('HGET', key, 'webhook') or '')
  if ok and type(hook) == 'table' and hook.owner ~= nil then return tostring(hook.owner), hook end
  return '', {}
end
-- An outcome is written only by the claim that holds the delivery: its lease is the claim's token and it is
-- still leased (a dispatcher whose attempt outlived its lease must not write over another's).
local function ours(key, id, token)
  return redis.call('HGET', key, 'lease') == token and redis.call('ZSCORE', '$LEASED', id) ~= false
end
-- The attempt is over: its slots are free and its endpoint's circuit learns what it said.
local function release(key, id, owner, verdict, now, failures_max, cooldown)
  local endpoint = redis.call('HGET', key, 'endpoint')
  redis.call('ZREM', '$LEASED', id)
  redis.call('HDEL', key, 'lease', 'endpoint')
  if not endpoint then return end
  redis.call('ZREM', '$ENDPOINT_LEASES' .. endpoint, id)
  redis.call('ZREM', '$OWNER_LEASES' .. owner, id)
  local state = '$ENDPOINT' .. endpoint
  local probe = redis.call('HGET', state, 'probe') == id
  if verdict == '$ANSWERED' then
    redis.call('DEL', state)
  elseif verdict == '$UNHEALTHY' then
    local failures = redis.call('HINCRBY', state, 'failures', 1)
    if probe or failures >= failures_max then redis.call('HSET', state, 'open_until', now + cooldown) end
    if probe then redis.call('HDEL', state, 'probe', 'probe_until') end
    redis.call('EXPIRE', state, math.ceil(cooldown) + $BREAKER_MEMORY_S)
  elseif probe then
    redis.call('HDEL', state, 'probe', 'probe_until')
  end
end
