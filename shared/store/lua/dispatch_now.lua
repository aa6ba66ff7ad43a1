-- requires: dispatch
-- The periodic tick's dispatch (shared/store/queues.py): fill a queue's list up to its window.
-- KEYS: the queue list. ARGV: the queues' key templates, the window. Returns how many jobs moved.
return dispatch(queue_keys(ARGV[1], KEYS[1]), tonumber(ARGV[2]))
