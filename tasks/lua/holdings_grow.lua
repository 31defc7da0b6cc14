-- ARGV: owner, kind, id, delta, now, max_bytes, max_total, force ('1').
return hold_grow(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8] == '1')
