-- requires: batch_end
-- Every line of a batch's input has been read (or its reading stopped: an error, a cancel): the batch ends now if
-- no item is left, else with its last item. KEYS: batch hash. ARGV: the batch's error as JSON ("" for none).
-- Returns 1 when this call ended the input, 0 when it had ended already.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'phase') == 'done' then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[1]) end
redis.call('HSET', KEYS[1], 'phase', 'done')
end_batch_if_done(KEYS[1])
return 1
