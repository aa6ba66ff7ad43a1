-- requires: dispatch
-- The sweep of a queue's waiting jobs (shared/store/queues.py): each job the index says waits for the list must be
-- in its key's line (or past its deadline, in the deadlines zset). Only scripts move a job between them, with its
-- status, so none should be missing; one that is (a Redis that kept part of its writes) goes back in its line.
-- KEYS: the queue list. ARGV: the queues' key templates, then job ids. Returns the ids put back.
local q = queue_keys(ARGV[1], KEYS[1])
local at = now()
local back = {}
for i = 2, #ARGV do
  local job_id = ARGV[i]
  local job = redis.call('HMGET', fill(q.job, 'job', job_id), 'status', 'owner', 'priority', 'deadline', 'message')
  local score = tonumber(redis.call('ZSCORE', q.index, job_id) or '0')
  if job[1] ~= 'queued' then
    redis.call('ZREM', q.index, job_id)
  elseif score >= WAITING_BASE and not (job[4] and tonumber(job[4]) <= at) and job[5] then
    local owner = job[2] or ''
    if not redis.call('ZSCORE', fill(q.waiting, 'owner', owner), job_id) then
      local rank = ({high = 0, normal = 1, low = 2})[job[3] or 'normal'] or 1
      wait_in_line(q, owner, job_id, rank, score - WAITING_BASE)
      table.insert(back, job_id)
    end
  end
end
return back
