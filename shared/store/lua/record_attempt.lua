-- requires: now
-- Record an attempt: log it, then (unless a later attempt has taken the delivery since) mark it delivered or
-- failed, or schedule the next attempt; a retry that would come after the give-up horizon fails it instead.
-- KEYS: delivery hash, its log, due zset. ARGV: member, attempt number, outcome (delivered, retry, failed),
-- delay seconds before a retry, give-up horizon seconds, the attempt as JSON, most log entries kept.
-- Returns the outcome as recorded, "stale" or "missing".
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local at = now()
local outcome = ARGV[3]
local next_at = at + tonumber(ARGV[4])
local start = tonumber(redis.call('HGET', KEYS[1], 'schedule_start'))
if outcome == 'retry' and next_at > start + tonumber(ARGV[5]) then outcome = 'failed' end
local entry = cjson.decode(ARGV[6])
entry.outcome = outcome
redis.call('RPUSH', KEYS[2], cjson.encode(entry))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
redis.call('EXPIRE', KEYS[2], math.max(redis.call('TTL', KEYS[1]), 1))
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 'stale' end
if outcome == 'retry' then
  redis.call('HSET', KEYS[1], 'next_at', tostring(next_at), 'lease_until', '0')
  redis.call('ZADD', KEYS[3], next_at, ARGV[1])
else
  redis.call('HSET', KEYS[1], 'status', outcome, 'lease_until', '0')
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return outcome
