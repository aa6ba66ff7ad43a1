-- requires: now, batch_end
-- A batch's items are jobs with three more fields: batch_key (the batch hash), custom_id and batch_line, and
-- retry_of on a new attempt of a failed item. create_job.lua admits them (admit_batch_item) and transition.lua
-- counts them (count_batch_item), so that the batch's counts by job status move in the same step as the jobs.

-- Whether the job just written (its fields are in job_key) may join its batch: one line claims one custom_id
-- (items_key: custom_id -> "<line> <job id>"); the same line again is the item it already made (a step that
-- ran twice), another line is a duplicate. Returns nil when admitted (the batch counts it queued), else the
-- create script's answer.
local function admit_batch_item(job_key, job_id, batch_key, items_key, order_key)
  local status = redis.call('HGET', batch_key, 'status')
  if status ~= 'validating' and status ~= 'in_progress' then return {'batch_closed', status or ''} end
  local item = redis.call('HMGET', job_key, 'custom_id', 'batch_line', 'retry_of')
  local held = redis.call('HGET', items_key, item[1])
  local held_line, held_job = nil, nil
  if held then held_line, held_job = string.match(held, '^(%S+) (%S+)$') end
  if held and held_line ~= item[2] then return {'duplicate', held_line} end
  if item[3] then
    if held_job ~= item[3] then return {'existing', (held_job or '') .. ' '} end  -- retried already
    redis.call('HINCRBY', batch_key, 'failed', -1)
  elseif held then
    return {'existing', held_job .. ' '}
  else
    redis.call('RPUSH', order_key, item[1])
  end
  redis.call('HSET', items_key, item[1], item[2] .. ' ' .. job_id)
  redis.call('HINCRBY', batch_key, 'queued', 1)
  if status == 'validating' then
    local at = tostring(now())
    redis.call('HSET', batch_key, 'status', 'in_progress', 'started_at', at, 'attempt_started_at', at)
  end
  return nil
end

-- A job of a batch moved from `current` to `new`: so does the batch's count; the last end ends the batch.
local function count_batch_item(job_key, current, new)
  local batch_key = redis.call('HGET', job_key, 'batch_key')
  if not batch_key or redis.call('EXISTS', batch_key) == 0 then return end
  redis.call('HINCRBY', batch_key, current, -1)
  redis.call('HINCRBY', batch_key, new, 1)
  end_batch_if_done(batch_key)
end
