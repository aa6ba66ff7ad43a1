-- requires: token_bucket, queue_position
-- The read behind every poll: the rate limit, then the job hash (flat field/value list) and, for a queued job,
-- where it stands (queue_position.lua), in one round trip.
-- KEYS: bucket key, job hash. ARGV: tokens per second, burst, job id, the queues' key templates, seconds within
-- which a worker's heartbeat counts it live. Returns {wait, fields, place} (fields empty when refused; place empty
-- unless the job is queued).
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait ~= '0' then return {wait, {}, {}} end
local fields = redis.call('HGETALL', KEYS[2])
local place = {}
for i = 1, #fields, 2 do
  if fields[i] == 'status' and fields[i + 1] == 'queued' then
    place = queue_position(KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
  end
end
return {wait, fields, place}
