-- requires: now
-- The end of a batch: once every line has been read (phase "done") and no item is queued or running, the batch
-- ends (completed, or failed when it carries an error, or it stays canceled) and its finish step is queued (the
-- batch worker writes the results, then the webhook outbox). Called by whatever moved the last count: an item's
-- transition, the end of the input, a cancel. The batch hash names its finish message and queue (shared/store/
-- batches.py writes them from keys.py), since the job transition that calls this learns the batch only from its job.
local function end_batch_if_done(batch_key)
  local state = redis.call('HMGET', batch_key, 'phase', 'queued', 'running', 'finished_at', 'status')
  if state[1] ~= 'done' or state[4] or tonumber(state[2] or '0') > 0 or tonumber(state[3] or '0') > 0 then
    return false
  end
  local final = state[5]
  if final ~= 'canceled' then
    final = redis.call('HEXISTS', batch_key, 'error') == 1 and 'failed' or 'completed'
  end
  redis.call('HSET', batch_key, 'status', final, 'finished_at', tostring(now()))
  local finish = redis.call('HMGET', batch_key, 'finish_queue', 'finish_message')
  redis.call('LPUSH', finish[1], finish[2])
  return true
end
