-- ARGV: as hold_renew's, in order.
return hold_renew(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
