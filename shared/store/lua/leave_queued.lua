-- requires: fill
-- A job leaves its queue's index of queued jobs; a start also moves the queue's watermark, the highest sequence
-- number a worker has started (messages are taken in order, so a job below it that is still queued after a
-- while lost its message: see requeue_lost.lua). The job hash names its queue; the index and watermark keys are
-- templates with {queue}.
local function leave_queued(job_key, job_id, status, index_template, watermark_template)
  local queue = redis.call('HGET', job_key, 'queue')
  if not queue then return end
  redis.call('ZREM', fill(index_template, 'queue', queue), job_id)
  if status ~= 'running' then return end
  local watermark = fill(watermark_template, 'queue', queue)
  local seq = tonumber(redis.call('HGET', job_key, 'seq') or '0')
  if seq > tonumber(redis.call('GET', watermark) or '0') then redis.call('SET', watermark, seq) end
end
