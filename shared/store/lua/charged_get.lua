-- requires: token_bucket, read_job
-- The read behind every poll: the rate limit, then the job and, for a queued job, where it stands (read_job.lua),
-- in one round trip.
-- KEYS: bucket key, job hash. ARGV: tokens per second, burst, job id, the queues' key templates.
-- Returns {wait, fields, place} (fields empty when refused; place as read_job.lua gives it).
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait ~= '0' then return {wait, {}, {}} end
local job = read_job(KEYS[2], ARGV[3], ARGV[4])
return {wait, job[1], job[2]}
