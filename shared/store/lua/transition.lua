-- requires: now, fill, outbox, leave_queued, batch_item
-- Compare-and-set of a job's status, so that two writers can never both win.
-- KEYS: job hash, the webhook due zset, the webhook queue, the count of jobs by status (moved from the old status
-- to the new one), the job's deliveries list.
-- ARGV: 1 new status, 2 allowed current statuses (space-separated), 3 done channel, 4 ttl seconds, 5 "1" when the
-- new status is terminal, 6 "1" to count an attempt, 7 job id, 8 owner's active-count template ({owner}),
-- 9 owner's endpoints template ({owner}), 10 delivery template ({delivery}), 11 the queues' key templates
-- (queue_keys.lua), 12 the queue's list window (dispatch.lua), 13 the webhook dispatch message, then field/value
-- pairs.
-- A terminal move also frees the owner's active-job slot, writes the webhook outbox and publishes on the done
-- channel, and the end of a job that ran is counted in its queue's throughput; a start refills the queue's list
-- (leave_queued.lua); a batch item's move also moves its batch's counts (batch_item.lua). Returns {applied (0/1), status
-- before the call ("" when the job does not exist), attempts}.
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
if current == 'queued' then leave_queued(KEYS[1], ARGV[7], ARGV[1], ARGV[11], tonumber(ARGV[12])) end
redis.call('HINCRBY', KEYS[4], current, -1)
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
count_batch_item(KEYS[1], current, ARGV[1])
for i = 14, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] == '1' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local owner = redis.call('HGET', KEYS[1], 'owner')
  local endpoints_key = nil
  if owner then
    local active = fill(ARGV[8], 'owner', owner)
    if tonumber(redis.call('DECR', active)) < 0 then redis.call('SET', active, 0) end
    endpoints_key = fill(ARGV[9], 'owner', owner)
  end
  write_outbox({job_key = KEYS[1], job_id = ARGV[7], status = ARGV[1], owner = owner, endpoints_key = endpoints_key,
                delivery_template = ARGV[10], deliveries_key = KEYS[5], due_key = KEYS[2], queue = KEYS[3],
                message = ARGV[13], ttl = tonumber(ARGV[4])})
  redis.call('PUBLISH', ARGV[3], ARGV[1])
  if current == 'running' then count_end(KEYS[1], ARGV[11]) end
end
return {1, current, attempts}
