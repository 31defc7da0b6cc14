-- A status note in a running job's stream (e.g. `queued`: it waits for room in the model's running batch).
-- KEYS: the job, its stream. ARGV: the note's JSON, the retention to use when the job has none of its own.
-- Returns 1 appended, 0 the job is not running.

if redis.call('HGET', KEYS[1], 'status') ~= $RUNNING then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', 'status', 'data', ARGV[1])
redis.call('EXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'ttl') or ARGV[2])
return 1
