-- requires: token_bucket, batch_item, dispatch
-- Create a job: the rate limit, idempotency check, the owner's active-job bound, the job hash, its place in its
-- key's line (with its queue message kept in the hash until dispatch.lua moves it to the list, at once when the
-- list has room) and the owner's index, all or nothing, in one round trip.
-- KEYS: 1 job hash, 2 queue list, 3 owner's job index (zset), 4 owner's active counter, 5 idempotency key ("" for
--       none), 6 the owner's token bucket key, 7 the count of jobs by status, 8 the queue's index of queued jobs
--       (a zset: job id -> sequence number), 9 the queue's sequence counter; for an item of a batch also 10 the
--       batch hash, 11 its items, 12 its order (batch_item.lua).
-- ARGV: 1 job ttl, 2 max active jobs, 3 index score, 4 job id, 5 request hash, 6 idempotency ttl, 7 queue message,
--       8 tokens per second, 9 burst, 10 the queues' key templates (queue_keys.lua), 11 the job's priority rank
--       (0 high, 1 normal, 2 low), 12 the list's window, 13 the time by which it must start ("" for none), then
--       the job hash's field/value pairs.
-- Returns {"created", ""}, {"existing", "<job id> <request hash>"}, {"queue_full", "<active>"} or
-- {"rate_limited", "<seconds to wait>"}; an item also {"duplicate", "<line>"} or {"batch_closed", "<status>"}.
local wait = take_token(KEYS[6], tonumber(ARGV[8]), tonumber(ARGV[9]))
if wait ~= '0' then return {'rate_limited', wait} end
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'existing', existing} end
end
local active = tonumber(redis.call('GET', KEYS[4]) or '0')
if active >= tonumber(ARGV[2]) then return {'queue_full', tostring(active)} end
-- One HSET for every field (a command each cost a third of this script's time), with the queue and its message.
redis.call('HSET', KEYS[1], 'queue', KEYS[2], 'message', ARGV[7], unpack(ARGV, 14))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
if KEYS[10] then
  local refused = admit_batch_item(KEYS[1], ARGV[4], KEYS[10], KEYS[11], KEYS[12])
  if refused then
    redis.call('DEL', KEYS[1])
    return refused
  end
end
-- The queue: a sequence number (its order within its key's line), the line, and the list if it has room.
local q = queue_keys(ARGV[10], KEYS[2])
local seq = redis.call('INCR', KEYS[9])
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'deadline', ARGV[13])
  redis.call('ZADD', q.deadlines, tonumber(ARGV[13]), ARGV[4])
end
wait_in_line(q, redis.call('HGET', KEYS[1], 'owner') or '', ARGV[4], tonumber(ARGV[11]), seq)
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
redis.call('INCR', KEYS[4])
redis.call('HINCRBY', KEYS[7], 'queued', 1)
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[4] .. ' ' .. ARGV[5], 'EX', tonumber(ARGV[6])) end
dispatch(q, tonumber(ARGV[12]))
return {'created', ''}
