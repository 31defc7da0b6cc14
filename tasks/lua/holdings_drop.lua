-- ARGV: owner, kind, id.
return hold_drop(ARGV[1], ARGV[2], ARGV[3])
