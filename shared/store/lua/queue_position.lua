-- requires: queue_keys
-- Where a queued job stands under dispatch.lua's policy: {jobs ahead of it, live workers of its queue, workers
-- still loading the model, jobs its queue ended in the last minute, 1 when only its own key's jobs wait ahead}. On the list, the jobs ahead are the queued
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

local function queue_position(job_key, job_id, templates, live_since)
  local job = redis.call('HMGET', job_key, 'queue', 'owner')
  if not job[1] then return {} end
  local q = queue_keys(templates, job[1])
  local clock = tonumber(redis.call('TIME')[1])
  local ended, bucket, buckets = 0, math.floor(clock / 10), {}
  for b = bucket - 6, bucket - 1 do buckets[#buckets + 1] = fill(q.ends, 'bucket', tostring(b)) end
  for _, count in ipairs(redis.call('MGET', unpack(buckets))) do ended = ended + (tonumber(count) or 0) end
  local ahead = jobs_ahead(q, job[2] or '', job_id)
  return {ahead[1], redis.call('ZCOUNT', q.serving, clock - live_since, '+inf'),
          redis.call('ZCOUNT', q.starting, clock - live_since, '+inf'), ended, ahead[2]}
end
