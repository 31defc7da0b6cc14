local DEAD_ENTRY, DEAD_INDEX, DEAD_KIND = 'DEAD_ENTRY_PREFIX', 'DEAD_LETTER_PREFIX', 'DEAD_LETTERS_KIND'
-- A requeue payload is {"task":..,"queue":..,"kwargs":KWARGS} (tasks/jobs/inflight.py requeue_payload) and an
-- inference's KWARGS {"model_id":..,"jobs":[WORK]} with its one job: the submission is WORK, or a load's KWARGS. (A
-- JSON string cannot hold these keys unescaped, so the first match is the key itself.)
local function dead_request(payload)
  local at = string.find(payload, '"kwargs":', 1, true)
  if not at or string.sub(payload, -1) ~= '}' then return '' end
  local kwargs = string.sub(payload, at + 9, -2)
  local jobs = string.find(kwargs, '"jobs":[', 1, true)
  if jobs and string.sub(kwargs, -2) == ']}' then return string.sub(kwargs, jobs + 8, -3) end
  return kwargs
end
-- A dead letter leaves: its hash, its index entry and its charge (the owner's, whether or not its hash expired).
local function dead_forget(job_id, owner, index)
  local entry = DEAD_ENTRY .. job_id
  local found = redis.call('HMGET', entry, 'queue', 'owner')
  redis.call('DEL', entry)
  if found[1] then redis.call('ZREM', DEAD_INDEX .. found[1], job_id) end
  if index then redis.call('ZREM', index, job_id) end
  owner = owner or found[2]
  if owner then hold_drop(owner, DEAD_KIND, job_id) end
end
local function dead_trim_owner(owner, newest, max_bytes, max_count)
  for _ = 1, TRIM_STEP do
    local bytes, count = hold_used(owner, DEAD_KIND)
    if (max_count <= 0 or count <= max_count) and (max_bytes <= 0 or bytes <= max_bytes) then return end
    local oldest = hold_oldest(owner, DEAD_KIND)
    if not oldest or oldest == newest then return end
    dead_forget(oldest, owner, nil)
  end
end
local function dead_trim_queue(queue, now, keep, most)
  local index = DEAD_INDEX .. queue
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - keep, 'LIMIT', 0, TRIM_STEP)) do
    dead_forget(id, nil, index)
  end
  local over = redis.call('ZCARD', index) - most
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', index, 0, math.min(over, TRIM_STEP) - 1)) do
      dead_forget(id, nil, index)
    end
  end
end
local function dead_put(job_id, queue, reason, now, owner, limits, fields)
  local keep, most, max_bytes, max_count = string.match(limits, '^(%d+) (%d+) (%d+) (%d+)$')
  keep, most, max_bytes, max_count = tonumber(keep), tonumber(most), tonumber(max_bytes), tonumber(max_count)
  if owner == '' then owner = 'NO_OWNER' end
  local entry = DEAD_ENTRY .. job_id
  local values = {'job_id', job_id, 'queue', queue, 'reason', reason, 'dead_at', string.format('%.6f', now),
    'owner', owner}
  local size = ENTRY_OVERHEAD
  for i = 1, #fields - 1, 2 do
    if fields[i + 1] ~= '' then
      table.insert(values, fields[i]); table.insert(values, fields[i + 1])
      size = size + #fields[i + 1]
    end
  end
  redis.call('DEL', entry)  -- a job's webhook failing after its own dead letter: the newer replaces it
  redis.call('HSET', entry, unpack(values))
  redis.call('EXPIRE', entry, keep)
  redis.call('ZADD', DEAD_INDEX .. queue, now, job_id)
  redis.call('EXPIRE', DEAD_INDEX .. queue, keep)
  redis.call('SADD', 'DEAD_LETTER_QUEUES', queue)
  redis.call('HINCRBY', 'METRICS_DEAD_LETTERS', queue .. '|' .. reason, 1)
  hold_put(owner, DEAD_KIND, job_id, size, now + keep, now, 0, 0, 0, true)
  dead_trim_owner(owner, job_id, max_bytes, max_count)
  dead_trim_queue(queue, now, keep, most)
end
