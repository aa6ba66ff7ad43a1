-- requires: now, queue_keys
-- The queue's policy: jobs wait in a zset per API key (ordered by priority, then submission), and move to the
-- model's Celery list only while it holds fewer than `window` messages (workers take what their slots allow, so
-- the list holds the surplus: a short one keeps the policy's order). Keys take turns by weighted fair queuing:
-- each waiting key has a virtual time (the owners zset); the least goes next and advances by 1 / its weight
-- (KEY_WEIGHTS, default 1). A key that starts waiting starts at the queue's clock (the virtual time last served)
-- or at its own last time, whichever is later, so neither a newcomer's burst nor a drain-and-refill jumps ahead.

-- A new job joins its key's line (its index score says it waits); its key joins the turns if it was not in them.
local function wait_in_line(q, owner, job_id, rank, seq)
  redis.call('ZADD', fill(q.waiting, 'owner', owner), rank * RANK_STEP + seq, job_id)
  redis.call('ZADD', q.index, WAITING_BASE + seq, job_id)
  if not redis.call('ZSCORE', q.owners, owner) then
    local clock = tonumber(redis.call('GET', q.clock) or '0')
    local last = tonumber(redis.call('HGET', q.vtimes, owner) or '0')
    redis.call('ZADD', q.owners, math.max(clock, last), owner)
  end
end

-- A key left the turns: it keeps its virtual time for when it comes back.
local function leave_turns(q, owner, vt)
  redis.call('ZREM', q.owners, owner)
  redis.call('HSET', q.vtimes, owner, vt)
end

-- The next job of the key whose turn it is onto the list. The job's hash keeps the message while the job is queued,
-- so that a cancel can take it back off the list (leave_queued.lua). A job past its deadline is not moved: it stays
-- in the deadlines zset, whose check ends it failed. Returns 1 when a job moved, 0 when one was passed over, nil when
-- no key waits.
local function dispatch_one(q, at)
  local head = redis.call('ZRANGE', q.owners, 0, 0, 'WITHSCORES')
  if #head == 0 then return nil end
  local owner, vt = head[1], tonumber(head[2])
  local waiting = fill(q.waiting, 'owner', owner)
  local popped = redis.call('ZPOPMIN', waiting)
  local moved = 0
  if popped[1] then
    local job_key = fill(q.job, 'job', popped[1])
    local job = redis.call('HMGET', job_key, 'status', 'message', 'deadline')
    if job[1] == 'queued' and job[2] and not (job[3] and tonumber(job[3]) <= at) then
      local seq = redis.call('INCR', q.seq)
      redis.call('HSET', job_key, 'seq', seq)
      redis.call('ZADD', q.index, seq, popped[1])
      redis.call('LPUSH', q.queue, job[2])
      redis.call('SET', q.clock, head[2])
      vt = vt + 1 / tonumber(redis.call('HGET', q.weights, owner) or '1')
      moved = 1
    end
  end
  if redis.call('EXISTS', waiting) == 1 then
    redis.call('ZADD', q.owners, vt, owner)
  else
    leave_turns(q, owner, vt)
  end
  return moved
end

-- Fill the list up to `window` messages; returns how many jobs moved. Passed-over jobs are bounded per call.
local function dispatch(q, window)
  local length = redis.call('LLEN', q.queue)
  local moved, tries, at = 0, 0, nil
  while length < window and tries < 2 * window do
    at = at or now()
    local one = dispatch_one(q, at)
    if one == nil then break end
    moved, length, tries = moved + one, length + one, tries + 1
  end
  return moved
end
