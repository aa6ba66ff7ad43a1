-- The end of a batch's attempt: once every line has been read (phase "done") and no item is queued or running, its
-- finish step is queued, once per attempt (field ending). That step writes the results, then sets the final status
-- and tells it (notify_batch.lua). Called by whatever moved the last count: an item's transition, the end of the
-- input, a cancel. The batch hash names its finish message and queue (shared/store/batches.py writes them from
-- keys.py), since the job transition that calls this learns the batch only from its job.
local function end_batch_if_done(batch_key)
  local state = redis.call('HMGET', batch_key, 'phase', 'queued', 'running', 'ending', 'attempt')
  if state[1] ~= 'done' or state[4] == state[5] or tonumber(state[2] or '0') > 0 or tonumber(state[3] or '0') > 0 then
    return false
  end
  redis.call('HSET', batch_key, 'ending', state[5])
  local finish = redis.call('HMGET', batch_key, 'finish_queue', 'finish_message')
  redis.call('LPUSH', finish[1], finish[2])
  return true
end
