-- requires: now
-- The delivery worker's dispatcher: every delivery due by now, each pushed back by a lease so that the next
-- poll does not take it again (if its message is lost, it comes due again when the lease ends).
-- KEYS: due zset. ARGV: most to take, lease seconds. Returns the members ("<job id> <delivery id>").
local at = now()
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', at, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(members) do redis.call('ZADD', KEYS[1], at + tonumber(ARGV[2]), member) end
return members
