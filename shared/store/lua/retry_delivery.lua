-- requires: now
-- Send a delivery again, now, on a fresh schedule (a manual retry): unless an attempt holds it right now. The
-- backoff starts over too (from the attempts made so far, kept in schedule_base).
-- KEYS: delivery hash, its log, due zset, webhook queue. ARGV: member, dispatch message, ttl seconds at least.
-- Returns "ok", "busy" or "missing".
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local at = now()
if redis.call('HGET', KEYS[1], 'status') == 'pending'
   and tonumber(redis.call('HGET', KEYS[1], 'lease_until')) > at then return 'busy' end
local stamp = tostring(at)
redis.call('HSET', KEYS[1], 'status', 'pending', 'next_at', stamp, 'schedule_start', stamp, 'lease_until', '0',
           'schedule_base', redis.call('HGET', KEYS[1], 'attempts'))
redis.call('ZADD', KEYS[3], at, ARGV[1])
local ttl = math.max(redis.call('TTL', KEYS[1]), tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ttl)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('LPUSH', KEYS[4], ARGV[2])
return 'ok'
