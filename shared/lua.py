"""The Lua scripts behind every multi-key change, so that each one is atomic in Redis.

Key names are built in shared/store.py and passed in; scripts that derive an owner's keys from a job (the
transition) get the prefix as an argument. visionq runs on one Redis (or a primary with replicas), not Cluster.
"""

# A token bucket per API key, as GCRA: the bucket is one number, the theoretical arrival time of the next
# request, so a request costs one GET and one SET (with its expiry) on the server's clock, which every API process
# shares. Returns "0" when a request may go ahead, else the seconds until one may.
_TOKEN_BUCKET = """
local function take_token(bucket_key, rate, burst)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local interval = 1 / rate
  local tat = math.max(tonumber(redis.call('GET', bucket_key) or now), now)
  local allowed_at = tat + interval - burst * interval
  if allowed_at > now then return tostring(allowed_at - now) end
  redis.call('SET', bucket_key, tostring(tat + interval), 'PX', math.ceil((tat + interval - now) * 1000) + 1)
  return '0'
end
"""

# KEYS[1] bucket key. ARGV: tokens per second, burst.
TAKE_TOKEN = _TOKEN_BUCKET + "return take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"

# The read behind every poll: the rate limit, then the job hash (flat field/value list), in one round trip.
# KEYS: bucket key, job hash. ARGV: tokens per second, burst. Returns {wait, fields} (fields empty when refused).
CHARGED_GET = _TOKEN_BUCKET + """
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait ~= '0' then return {wait, {}} end
return {wait, redis.call('HGETALL', KEYS[2])}
"""

# Server time in seconds, as a float: every webhook schedule is on the clock every process shares.
_NOW = """
local function now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
"""

# The webhook outbox, written by the terminal transition itself, so that an ended job's event exists exactly
# when its end does (a worker killed right after still leaves it to send; a second transition never comes).
# One delivery per webhook that wants the event: the job's own (id "job") and the owner's registered endpoints
# (id = endpoint id). Each is a hash <job key>:delivery:<id> (its attempts in <that>:log), listed in
# <job key>:deliveries, and due now in the due zset (member "<job id> <delivery id>"); then one dispatch message
# goes on the webhook queue so that a delivery worker moves them to its queue at once.
_OUTBOX = _NOW + """
local function wants(events, event)
  if events == nil or events == cjson.null then return true end
  for _, name in ipairs(events) do
    if name == event then return true end
  end
  return false
end

local function webhook_targets(job_key, event, owner, owner_prefix)
  local targets = {}
  local hook = redis.call('HGET', job_key, 'webhook')
  if hook then
    local spec = cjson.decode(hook)
    if wants(spec.events, event) then table.insert(targets, {'job', spec.url, ''}) end
  end
  if owner then
    for _, raw in ipairs(redis.call('HVALS', owner_prefix .. owner .. ':webhooks')) do
      local endpoint = cjson.decode(raw)
      if wants(endpoint.events, event) then table.insert(targets, {endpoint.id, endpoint.url, endpoint.id}) end
    end
  end
  return targets
end

local function write_outbox(job_key, status, owner, owner_prefix, due_key, queue, message, ttl)
  local event = 'job.' .. status
  local targets = webhook_targets(job_key, event, owner, owner_prefix)
  if #targets == 0 then return end
  local job_id = string.match(job_key, '([^:]+)$')
  local at = tostring(now())
  for _, target in ipairs(targets) do
    local key = job_key .. ':delivery:' .. target[1]
    redis.call('HSET', key, 'id', target[1], 'event_id', 'msg_' .. job_id, 'type', event, 'url', target[2],
               'endpoint_id', target[3], 'owner', owner or '', 'status', 'pending', 'created_at', at,
               'schedule_start', at, 'next_at', at, 'lease_until', '0', 'attempts', '0')
    redis.call('EXPIRE', key, ttl)
    redis.call('RPUSH', job_key .. ':deliveries', target[1])
    redis.call('ZADD', due_key, at, job_id .. ' ' .. target[1])
  end
  redis.call('EXPIRE', job_key .. ':deliveries', ttl)
  redis.call('LPUSH', queue, message)
end
"""

# A job leaves its queue's index of queued jobs; a start also moves the queue's watermark, the highest sequence
# number a worker has started (messages are taken in order, so a job below it that is still queued after a
# while lost its message: see REQUEUE_LOST).
_LEAVE_QUEUED = """
local function leave_queued(job_key, status)
  local index = redis.call('HGET', job_key, 'queued_in')
  if not index then return end
  redis.call('ZREM', index, string.match(job_key, '([^:]+)$'))
  if status ~= 'running' then return end
  local seq = tonumber(redis.call('HGET', job_key, 'seq') or '0')
  if seq > tonumber(redis.call('GET', index .. ':started') or '0') then redis.call('SET', index .. ':started', seq) end
end
"""

# Compare-and-set of a job's status, so that two writers can never both win.
# KEYS: job hash, the webhook due zset, the webhook queue, the count of jobs by status (moved from the old status
# to the new one).
# ARGV: new status, allowed current statuses (space-separated), done channel, ttl seconds, "1" when the new
# status is terminal, "1" to count an attempt, owner key prefix, the webhook dispatch message, then field/value
# pairs.
# A terminal move also frees the owner's active-job slot, writes the webhook outbox and publishes on the done
# channel. Returns {applied (0/1), status before the call ("" when the job does not exist), attempts}.
TRANSITION = _OUTBOX + _LEAVE_QUEUED + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, '', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local allowed = false
for status in string.gmatch(ARGV[2], '%S+') do
  if status == current then allowed = true end
end
if not allowed then return {0, current, attempts} end
if ARGV[6] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if current == 'queued' then leave_queued(KEYS[1], ARGV[1]) end
redis.call('HINCRBY', KEYS[4], current, -1)
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] == '1' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner then
    local active = ARGV[7] .. owner .. ':active'
    if tonumber(redis.call('DECR', active)) < 0 then redis.call('SET', active, 0) end
  end
  write_outbox(KEYS[1], ARGV[1], owner, ARGV[7], KEYS[2], KEYS[3], ARGV[8], tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return {1, current, attempts}
"""

# Create a job: the rate limit, idempotency check, the owner's active-job bound, the job hash, its queue
# message and the owner's index, all or nothing, in one round trip.
# KEYS: job hash, queue list, owner's job index (zset), owner's active counter, idempotency key ("" for none),
#       the owner's token bucket key, the count of jobs by status, the queue's index of queued jobs (a zset:
#       job id -> sequence number), the queue's sequence counter.
# ARGV: job ttl, max active jobs, index score, job id, request hash, idempotency ttl, queue message,
#       tokens per second, burst, then the job hash's field/value pairs.
# Returns {"created", ""}, {"existing", "<job id> <request hash>"}, {"queue_full", "<active>"} or
# {"rate_limited", "<seconds to wait>"}.
CREATE_JOB = _TOKEN_BUCKET + """
local wait = take_token(KEYS[6], tonumber(ARGV[8]), tonumber(ARGV[9]))
if wait ~= '0' then return {'rate_limited', wait} end
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'existing', existing} end
end
local active = tonumber(redis.call('GET', KEYS[4]) or '0')
if active >= tonumber(ARGV[2]) then return {'queue_full', tostring(active)} end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
local seq = redis.call('INCR', KEYS[9])
redis.call('HSET', KEYS[1], 'seq', seq, 'queued_in', KEYS[8])
redis.call('ZADD', KEYS[8], seq, ARGV[4])
redis.call('LPUSH', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
redis.call('INCR', KEYS[4])
redis.call('HINCRBY', KEYS[7], 'queued', 1)
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[4] .. ' ' .. ARGV[5], 'EX', tonumber(ARGV[6])) end
return {'created', ''}
"""



# KEYS[1] a hash; ARGV[1] a field, ARGV[2] a number: the field becomes the larger of the two.
MAX_FIELD = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""

# The delivery worker's dispatcher: every delivery due by now, each pushed back by a lease so that the next
# poll does not take it again (if its message is lost, it comes due again when the lease ends).
# KEYS: due zset. ARGV: most to take, lease seconds. Returns the members ("<job id> <delivery id>").
TAKE_DUE = _NOW + """
local at = now()
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', at, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(members) do redis.call('ZADD', KEYS[1], at + tonumber(ARGV[2]), member) end
return members
"""

# Take a delivery for one attempt: only a pending one whose time has come and that no live attempt holds.
# The lease is also its new due time, so that an attempt whose worker dies is made again once it ends.
# KEYS: delivery hash, due zset. ARGV: member, lease seconds.
# Returns {attempt number, the hash's fields} or {0, why not}.
CLAIM_DELIVERY = _NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, status or 'missing'}
end
local at = now()
if tonumber(redis.call('HGET', KEYS[1], 'next_at')) > at then return {0, 'not_due'} end
if tonumber(redis.call('HGET', KEYS[1], 'lease_until')) > at then return {0, 'leased'} end
local lease_until = at + tonumber(ARGV[2])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'lease_until', tostring(lease_until))
redis.call('ZADD', KEYS[2], lease_until, ARGV[1])
return {attempt, redis.call('HGETALL', KEYS[1])}
"""

# Record an attempt: log it, then (unless a later attempt has taken the delivery since) mark it delivered or
# failed, or schedule the next attempt; a retry that would come after the give-up horizon fails it instead.
# KEYS: delivery hash, its log, due zset. ARGV: member, attempt number, outcome (delivered, retry, failed),
# delay seconds before a retry, give-up horizon seconds, the attempt as JSON, most log entries kept.
# Returns the outcome as recorded, "stale" or "missing".
RECORD_ATTEMPT = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local at = now()
local outcome = ARGV[3]
local next_at = at + tonumber(ARGV[4])
local start = tonumber(redis.call('HGET', KEYS[1], 'schedule_start'))
if outcome == 'retry' and next_at > start + tonumber(ARGV[5]) then outcome = 'failed' end
local entry = cjson.decode(ARGV[6])
entry.outcome = outcome
redis.call('RPUSH', KEYS[2], cjson.encode(entry))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
redis.call('EXPIRE', KEYS[2], math.max(redis.call('TTL', KEYS[1]), 1))
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 'stale' end
if outcome == 'retry' then
  redis.call('HSET', KEYS[1], 'next_at', tostring(next_at), 'lease_until', '0')
  redis.call('ZADD', KEYS[3], next_at, ARGV[1])
else
  redis.call('HSET', KEYS[1], 'status', outcome, 'lease_until', '0')
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return outcome
"""

# Send a delivery again, now, on a fresh schedule (a manual retry): unless an attempt holds it right now. The
# backoff starts over too (from the attempts made so far, kept in schedule_base).
# KEYS: delivery hash, its log, due zset, webhook queue. ARGV: member, dispatch message, ttl seconds at least.
# Returns "ok", "busy" or "missing".
RETRY_DELIVERY = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local at = now()
if redis.call('HGET', KEYS[1], 'status') == 'pending'
   and tonumber(redis.call('HGET', KEYS[1], 'lease_until')) > at then return 'busy' end
local stamp = tostring(at)
redis.call('HSET', KEYS[1], 'status', 'pending', 'next_at', stamp, 'schedule_start', stamp, 'lease_until', '0',
           'schedule_base', redis.call('HGET', KEYS[1], 'attempts'))
redis.call('ZADD', KEYS[3], at, ARGV[1])
local ttl = math.max(redis.call('TTL', KEYS[1]), tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ttl)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('LPUSH', KEYS[4], ARGV[2])
return 'ok'
"""

# Register a webhook endpoint unless the owner already has as many as allowed (a check and a write that two
# concurrent registrations must not both pass). KEYS: the owner's endpoint hash. ARGV: most endpoints, endpoint
# id, endpoint JSON. Returns 1 when added, 0 when full.
ADD_ENDPOINT = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""

# Put a job's message on its queue again, if the job is still queued and no worker holds its message: the
# sweeper's last word on a job whose message was lost (a Redis crash between a worker's BRPOP and its write of
# the unacknowledged copy, or an AOF that kept the job but not the message). It gets a new sequence number.
# KEYS: job hash, queue list, the queue's index of queued jobs, its sequence counter, kombu's unacked hash.
# ARGV: job id, the message. Returns 1 when requeued, 0 when not (no longer queued, or a worker holds it).
REQUEUE_LOST = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
for _, held in ipairs(redis.call('HVALS', KEYS[5])) do
  if string.find(held, ARGV[1], 1, true) then return 0 end
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""
