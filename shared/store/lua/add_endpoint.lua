-- Register a webhook endpoint unless the owner already has as many as allowed (a check and a write that two
-- concurrent registrations must not both pass). KEYS: the owner's endpoint hash. ARGV: most endpoints, endpoint
-- id, endpoint JSON. Returns 1 when added, 0 when full.
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
