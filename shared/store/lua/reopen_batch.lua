-- requires: now
-- Retry a completed batch's failed items: a new attempt of the batch, whose step gives each failed item a new job
-- (same custom_id); it ends again, with an event of its own, when they have. Only once the batch has completed
-- (its finish step is over: the status is set there), and only when an item failed.
-- KEYS: batch hash, batch queue, the open batches' zset, then the batch's other keys (they expire after its end:
-- kept while it runs again). ARGV: the step message, the new attempt's finish message, when its items' lifetimes
-- are next renewed.
-- Returns {1, ""} or {0, why: "missing", the status or "nothing_failed"}.
local state = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'failed', 'succeeded', 'canceled')
if not state[1] then return {0, 'missing'} end
if state[1] ~= 'completed' then return {0, state[1]} end
if tonumber(state[3] or '0') <= 0 then return {0, 'nothing_failed'} end
local at = tostring(now())
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'phase', 'retrying', 'cursor', '', 'attempt',
           tonumber(state[2]) + 1, 'attempt_started_at', at, 'finish_message', ARGV[2],
           'ended_base', tonumber(state[4] or '0') + tonumber(state[5] or '0'))
redis.call('HDEL', KEYS[1], 'finished_at')
redis.call('PERSIST', KEYS[1])
for i = 4, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), redis.call('HGET', KEYS[1], 'id'))
redis.call('LPUSH', KEYS[2], ARGV[1])
return {1, ''}
