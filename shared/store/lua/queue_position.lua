-- requires: queue_keys
-- Where a queued job stands under dispatch.lua's policy. On the list, the jobs ahead are the queued
-- ones with a lower sequence number there. Waiting, they are every job on the list, the jobs ahead in its key's
-- line, and each other key's jobs whose turn comes first: the job's turn comes at its key's virtual time plus its
-- rank / weight, another key's i-th at that key's time plus i / its weight (ties go to the key that sorts first).
-- At most 100 other keys are counted (beyond that it is a lower bound). Returns {ahead, 1 when no other key's
-- waiting job goes first and its own key's do (the key takes all the turns it gets), else 0}.
local function jobs_ahead(q, owner, job_id)
  local score = redis.call('ZSCORE', q.index, job_id)
  if not score then return {0, 0} end
  if tonumber(score) < WAITING_BASE then return {redis.call('ZCOUNT', q.index, '-inf', '(' .. score), 0} end
  local ahead = redis.call('ZCOUNT', q.index, '-inf', string.format('(%d', WAITING_BASE))
  local rank = redis.call('ZRANK', fill(q.waiting, 'owner', owner), job_id)
  local vt = redis.call('ZSCORE', q.owners, owner)
  if not rank or not vt then return {ahead, 0} end
  local turn = tonumber(vt) + rank / tonumber(redis.call('HGET', q.weights, owner) or '1')
  ahead = ahead + rank
  local others = redis.call('ZRANGEBYSCORE', q.owners, '-inf', turn, 'WITHSCORES', 'LIMIT', 0, 101)
  local own_only = rank > 0 and 1 or 0
  for i = 1, #others, 2 do
    local other = others[i]
    if other ~= owner then
      local span = (turn - tonumber(others[i + 1])) * tonumber(redis.call('HGET', q.weights, other) or '1')
      local turns = math.ceil(span - 1e-9)
      if other < owner then turns = math.floor(span + 1e-9) + 1 end
      local theirs = math.min(turns, redis.call('ZCARD', fill(q.waiting, 'owner', other)))
      if theirs > 0 then own_only = 0 end
      ahead = ahead + theirs
    end
  end
  return {ahead, own_only}
end

-- The jobs ahead of a queued job of `owner` in `queue`. The queue's figures (workers, recent throughput) are not
-- read here: they are the same for every job of the queue, and each API process keeps them for a second
-- (shared/store/queues.py: QueueFigures), which halves this script's cost on every poll.
local function queue_position(queue, owner, job_id, templates)
  return jobs_ahead(queue_keys(templates, queue), owner, job_id)
end
