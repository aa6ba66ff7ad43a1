-- requires: token_bucket, queue_position
-- The read behind every poll: the rate limit, then the job hash (flat field/value list, without the queue message
-- a waiting job keeps) and, for a queued job, where it stands (queue_position.lua), in one round trip.
-- KEYS: bucket key, job hash. ARGV: tokens per second, burst, job id, the queues' key templates, seconds within
-- which a worker's heartbeat counts it live. Returns {wait, fields, place} (fields empty when refused; place empty
-- unless the job is queued).
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait ~= '0' then return {wait, {}, {}} end
local fields, kept, queued = redis.call('HGETALL', KEYS[2]), {}, false
for i = 1, #fields, 2 do
  if fields[i] ~= 'message' then
    kept[#kept + 1] = fields[i]
    kept[#kept + 1] = fields[i + 1]
  end
  if fields[i] == 'status' and fields[i + 1] == 'queued' then queued = true end
end
if not queued then return {wait, kept, {}} end
return {wait, kept, queue_position(KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))}
