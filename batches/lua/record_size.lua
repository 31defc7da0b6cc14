-- The size charged for a batch's record: its fields and values.
local function record_size(key)
  local size = $RECORD_OVERHEAD
  for _, part in ipairs(redis.call('HGETALL', key)) do size = size + #part end
  return size
end
