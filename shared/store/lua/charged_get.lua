-- requires: token_bucket
-- The read behind every poll: the rate limit, then the job hash (flat field/value list), in one round trip.
-- KEYS: bucket key, job hash. ARGV: tokens per second, burst. Returns {wait, fields} (fields empty when refused).
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait ~= '0' then return {wait, {}} end
return {wait, redis.call('HGETALL', KEYS[2])}
