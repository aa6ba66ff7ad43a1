-- requires: queue_keys, dispatch
-- A job leaves its queue's index of queued jobs, its key's line (if it still waited there) and the deadlines; a
-- start also moves the queue's watermark, the highest sequence number a worker has started (messages are taken in
-- order, so a job below it that is still queued after a while lost its message: see requeue_lost.lua). A job that
-- ends from the list without starting (canceled, past its deadline) takes its message back off the list. Either
-- way the list is refilled at once (dispatch.lua), not at the next tick: the window slot the job held is free. The
-- job hash names its queue and owner, and holds its message until now.
local function leave_queued(job_key, job_id, status, templates, window)
  local queue = redis.call('HGET', job_key, 'queue')
  if not queue then return end
  local q = queue_keys(templates, queue)
  local score = tonumber(redis.call('ZSCORE', q.index, job_id) or WAITING_BASE)
  redis.call('ZREM', q.index, job_id)
  redis.call('ZREM', q.deadlines, job_id)
  local owner = redis.call('HGET', job_key, 'owner') or ''
  local waiting = fill(q.waiting, 'owner', owner)
  if redis.call('ZREM', waiting, job_id) == 1 and redis.call('EXISTS', waiting) == 0 then
    local vt = redis.call('ZSCORE', q.owners, owner)
    if vt then leave_turns(q, owner, vt) end
  end
  local message = redis.call('HGET', job_key, 'message')
  redis.call('HDEL', job_key, 'message')
  if status == 'running' then
    local seq = tonumber(redis.call('HGET', job_key, 'seq') or '0')
    if seq > tonumber(redis.call('GET', q.watermark) or '0') then redis.call('SET', q.watermark, seq) end
  elseif score < WAITING_BASE and message then
    redis.call('LREM', q.queue, 1, message)  -- 0 when a worker already holds it (it will skip the job)
  end
  dispatch(q, window)
end
