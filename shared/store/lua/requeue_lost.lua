-- Put a job's message on its queue again, if the job is still queued and no worker holds its message: the
-- sweeper's last word on a job whose message was lost (a Redis crash between a worker's BRPOP and its write of
-- the unacknowledged copy, or an AOF that kept the job but not the message). It gets a new sequence number.
-- KEYS: job hash, queue list, the queue's index of queued jobs, its sequence counter, kombu's unacked hash.
-- ARGV: job id, the message. Returns 1 when requeued, 0 when not (no longer queued, or a worker holds it).
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
for _, held in ipairs(redis.call('HVALS', KEYS[5])) do
  if string.find(held, ARGV[1], 1, true) then return 0 end
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, 'message', ARGV[2])  -- what a cancel takes off the list
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
