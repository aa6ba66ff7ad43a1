-- requires: fill
-- The keys of one queue's structures (shared/store/queues.py), from the templates of shared/store/keys.py that
-- the caller passes as one JSON object: {queue} filled in each here; waiting keeps {owner}, job {job}, ends {bucket},
-- minutes {minute}.
-- WAITING_BASE: a job's score in the queue's index while it waits for the list (2^50 + its sequence number; on the
-- list, its sequence number alone), so that the lost-message sweep tells the two apart.
local WAITING_BASE = 1125899906842624
local RANK_STEP = 17592186044416  -- 2^44: a priority rank outweighs any sequence number in a key's waiting zset

-- Each key is filled in when first used (a script touches a few of them; the poll runs on every request).
local function queue_keys(templates_json, queue)
  local templates = cjson.decode(templates_json)
  return setmetatable({queue = queue}, {__index = function(q, name)
    local key = fill(templates[name], 'queue', queue)
    rawset(q, name, key)
    return key
  end})
end

-- One more job of this queue ended after running: its 10-second bucket of the recent throughput.
local function count_end(job_key, templates)
  local queue = redis.call('HGET', job_key, 'queue')
  if not queue then return end
  local clock = redis.call('TIME')
  local q = queue_keys(templates, queue)
  local key = fill(q.ends, 'bucket', tostring(math.floor(tonumber(clock[1]) / 10)))
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 120)
  -- Per minute, kept an hour and a little: the console's chart of the last hour (one key a minute per queue).
  local minute = fill(q.minutes, 'minute', tostring(math.floor(tonumber(clock[1]) / 60)))
  redis.call('INCR', minute)
  redis.call('EXPIRE', minute, 3900)
end
