-- A delivery whose record is gone (expired) while leased: nothing to send, nothing to keep. ARGV: id.
if redis.call('EXISTS', '$DELIVERY' .. ARGV[1]) == 0 then redis.call('ZREM', '$LEASED', ARGV[1]) end
return 1
