-- requires: now
-- Take a delivery for one attempt: only a pending one whose time has come and that no live attempt holds.
-- The lease is also its new due time, so that an attempt whose worker dies is made again once it ends.
-- KEYS: delivery hash, due zset. ARGV: member, lease seconds.
-- Returns {attempt number, the hash's fields} or {0, why not}.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, status or 'missing'}
end
local at = now()
if tonumber(redis.call('HGET', KEYS[1], 'next_at')) > at then return {0, 'not_due'} end
if tonumber(redis.call('HGET', KEYS[1], 'lease_until')) > at then return {0, 'leased'} end
local lease_until = at + tonumber(ARGV[2])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'lease_until', tostring(lease_until))
redis.call('ZADD', KEYS[2], lease_until, ARGV[1])
return {attempt, redis.call('HGETALL', KEYS[1])}
