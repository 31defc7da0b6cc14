-- ARGV: owner, kind, id, size, expires_at, now, max_bytes, max_count, max_total, force ('1').
local force = ARGV[10] == '1'
return hold_put(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], force)
