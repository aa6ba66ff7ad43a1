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

# Compare-and-set of a job's status, so that two writers can never both win.
# KEYS[1] job hash, KEYS[2] the count of jobs by status (moved from the old status to the new one).
# ARGV: new status, allowed current statuses (space-separated), done channel, ttl seconds,
# "1" when the new status is terminal, "1" to count an attempt, owner key prefix, then field/value pairs.
# A terminal move also frees the owner's active-job slot and publishes on the done channel.
# Returns {applied (0/1), status before the call ("" when the job does not exist), attempts}.
TRANSITION = """
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
redis.call('HINCRBY', KEYS[2], current, -1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] == '1' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner then
    local active = ARGV[7] .. owner .. ':active'
    if tonumber(redis.call('DECR', active)) < 0 then redis.call('SET', active, 0) end
  end
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return {1, current, attempts}
"""

# Create a job: the rate limit, idempotency check, the owner's active-job bound, the job hash, its queue
# message and the owner's index, all or nothing, in one round trip.
# KEYS: job hash, queue list, owner's job index (zset), owner's active counter, idempotency key ("" for none),
#       the owner's token bucket key, the count of jobs by status.
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
redis.call('LPUSH', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
redis.call('INCR', KEYS[4])
redis.call('HINCRBY', KEYS[7], 'queued', 1)
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[4] .. ' ' .. ARGV[5], 'EX', tonumber(ARGV[6])) end
return {'created', ''}
"""


