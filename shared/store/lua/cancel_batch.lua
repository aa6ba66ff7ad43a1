-- requires: now, batch_end
-- Cancel a batch that has not ended: no item is admitted after this, and the batch worker cancels the items still
-- queued or running (a running one stops at its next decode step). KEYS: batch hash, batch queue. ARGV: the
-- statuses it may be canceled from (space-separated), the cancel step's message.
-- Returns {1, status before} or {0, status ("" when there is no such batch)}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
local allowed = false
for name in string.gmatch(ARGV[1], '%S+') do
  if name == status then allowed = true end
end
if not allowed then return {0, status} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'canceled_at', tostring(now()))
redis.call('LPUSH', KEYS[2], ARGV[2])
end_batch_if_done(KEYS[1])
return {1, status}
