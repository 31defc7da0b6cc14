local HOLD_PREFIX, HOLD_TOTAL, HOLD_OWNERS = 'HOLDINGS_PREFIX', 'HOLDINGS_TOTAL', 'HOLDINGS_OWNERS'
local function hold_keys(owner, kind)
  local base = HOLD_PREFIX .. owner
  return base, base .. ':' .. kind, base .. ':' .. kind .. ':size'
end
local function hold_change(totals, kind, bytes, count)
  if bytes ~= 0 then
    redis.call('HINCRBY', totals, kind .. '.bytes', bytes)
    redis.call('HINCRBY', HOLD_TOTAL, kind .. '.bytes', bytes)
    redis.call('HINCRBY', HOLD_TOTAL, 'bytes', bytes)
  end
  if count ~= 0 then
    redis.call('HINCRBY', totals, kind .. '.count', count)
    redis.call('HINCRBY', HOLD_TOTAL, kind .. '.count', count)
  end
end
local function hold_prune(owner, kind, now, limit)
  if limit <= 0 then return 0 end
  local totals, index, sizes = hold_keys(owner, kind)
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(gone) do
    hold_change(totals, kind, -tonumber(redis.call('HGET', sizes, id) or '0'), -1)
    redis.call('HDEL', sizes, id)
    redis.call('ZREM', index, id)
  end
  return #gone
end
-- The account's keys live until its furthest object's expiry (plus slack), and the owner is listed that long.
local function hold_keep(owner, kind, now)
  local totals, index, sizes = hold_keys(owner, kind)
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if not last[2] then return end
  local until_ = math.ceil(tonumber(last[2]) + SLACK_S)
  for _, key in ipairs({totals, index, sizes}) do
    local ttl = redis.call('TTL', key)
    if ttl == -1 or (ttl >= 0 and now + ttl < until_) then redis.call('EXPIREAT', key, until_) end
  end
  if until_ > tonumber(redis.call('ZSCORE', HOLD_OWNERS, owner) or '0') then
    redis.call('ZADD', HOLD_OWNERS, until_, owner)
  end
end
local function hold_used(owner, kind)
  local totals = hold_keys(owner, kind)
  local got = redis.call('HMGET', totals, kind .. '.bytes', kind .. '.count')
  return tonumber(got[1] or '0'), tonumber(got[2] or '0')
end
local function hold_over_total(delta, max_total)
  if max_total <= 0 or delta <= 0 then return false end
  return tonumber(redis.call('HGET', HOLD_TOTAL, 'bytes') or '0') + delta > max_total
end
local function hold_put(owner, kind, id, size, expires_at, now, max_bytes, max_count, max_total, force)
  local totals, index, sizes = hold_keys(owner, kind)
  now = tonumber(now)
  hold_prune(owner, kind, now, 20)
  size, max_bytes, max_count, max_total = tonumber(size), tonumber(max_bytes), tonumber(max_count), tonumber(max_total)
  local old = redis.call('HGET', sizes, id)
  local delta, added = size - tonumber(old or '0'), 1
  if old then added = 0 end
  if not force then
    local bytes, count = hold_used(owner, kind)
    if max_bytes > 0 and delta > 0 and bytes + delta > max_bytes then return -1 end
    if max_count > 0 and added > 0 and count + 1 > max_count then return -2 end
    if hold_over_total(delta, max_total) then return -3 end
  end
  redis.call('HSET', sizes, id, size)
  redis.call('ZADD', index, expires_at, id)
  hold_change(totals, kind, delta, added)
  hold_keep(owner, kind, now)
  return 1
end
local function hold_grow(owner, kind, id, delta, now, max_bytes, max_total, force)
  local totals, index, sizes = hold_keys(owner, kind)
  delta, max_bytes, max_total = tonumber(delta), tonumber(max_bytes), tonumber(max_total)
  if not redis.call('ZSCORE', index, id) then return 0 end
  if not force then
    local bytes = hold_used(owner, kind)
    if max_bytes > 0 and delta > 0 and bytes + delta > max_bytes then return -1 end
    if hold_over_total(delta, max_total) then return -3 end
  end
  redis.call('HINCRBY', sizes, id, delta)
  hold_change(totals, kind, delta, 0)
  return 1
end
local function hold_renew(owner, kind, id, expires_at, now)
  local totals, index = hold_keys(owner, kind)
  if not redis.call('ZSCORE', index, id) then return 0 end
  redis.call('ZADD', index, expires_at, id)
  hold_keep(owner, kind, tonumber(now))
  return 1
end
local function hold_drop(owner, kind, id)
  local totals, index, sizes = hold_keys(owner, kind)
  if not redis.call('ZSCORE', index, id) then return 0 end
  local size = tonumber(redis.call('HGET', sizes, id) or '0')
  hold_change(totals, kind, -size, -1)
  redis.call('HDEL', sizes, id)
  redis.call('ZREM', index, id)
  return size
end
local function hold_oldest(owner, kind)
  local totals, index = hold_keys(owner, kind)
  local first = redis.call('ZRANGE', index, 0, 0)
  return first[1] or false
end
