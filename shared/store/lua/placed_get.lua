-- requires: read_job
-- The job and, for a queued job, where it stands (read_job.lua), without a rate-limit charge: the reads of a poll
-- that waits (?wait=), which paid for itself in its first read.
-- KEYS: job hash. ARGV: job id, the queues' key templates. Returns {fields, place}.
return read_job(KEYS[1], ARGV[1], ARGV[2])
