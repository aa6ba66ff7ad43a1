-- requires: now, fill, outbox
-- The end of a batch's attempt, told once: its final status and time, and the webhook outbox (the batch's own
-- webhook and the owner's endpoints that want the event), with the event's body. The finish step calls it last,
-- after the results are written, with the status it read (a cancel in between changes it: the step reads again).
-- KEYS: batch hash, webhook due zset, webhook queue, the batch's deliveries list.
-- ARGV: 1 batch id, 2 attempt, 3 event id, 4 delivery template ({delivery}), 5 owner's endpoints template
-- ({owner}), 6 the webhook dispatch message, 7 ttl seconds, 8 the event's body, 9 the status read, 10 the final
-- status, 11 the finish time.
-- Returns 1 when told, 0 when not (another attempt, not ending, told already), -1 when the status changed.
local state = redis.call('HMGET', KEYS[1], 'attempt', 'ending', 'notified', 'status', 'owner')
if state[1] ~= ARGV[2] or state[2] ~= ARGV[2] or state[3] == ARGV[2] then return 0 end
if state[4] ~= ARGV[9] then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[10], 'finished_at', ARGV[11], 'notified', ARGV[2])
local endpoints_key = nil
if state[5] then endpoints_key = fill(ARGV[5], 'owner', state[5]) end
local suffix = ''
if ARGV[2] ~= '1' then suffix = '-' .. ARGV[2] end
write_outbox({job_key = KEYS[1], job_id = ARGV[1], status = ARGV[10], event = 'batch.' .. ARGV[10],
              event_id = ARGV[3], delivery_suffix = suffix, payload = ARGV[8], owner = state[5],
              endpoints_key = endpoints_key, delivery_template = ARGV[4], deliveries_key = KEYS[4],
              due_key = KEYS[2], queue = KEYS[3], message = ARGV[6], ttl = tonumber(ARGV[7])})
return 1
