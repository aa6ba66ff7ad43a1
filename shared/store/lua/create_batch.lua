-- Create a batch: the idempotency check, the batch hash, its input (inline chunks, or the JSONL upload it takes
-- over), the owner's index, the open batches' index and the first step's message on the batch queue, all or
-- nothing.
-- KEYS: 1 batch hash, 2 idempotency key ("" for none), 3 owner's batches zset, 4 batch queue, 5 the upload hash
-- ("" unless the input is an upload), 6 the upload's chunks, 7 the batch's input list, 8 the open batches' zset.
-- ARGV: 1 batch id, 2 request hash, 3 idempotency ttl, 4 index score, 5 the step message, 6 owner, 7 the batch
-- hash's fields as a JSON object, 8 when its items' lifetimes are first renewed, then the input's chunks (inline
-- requests as JSONL).
-- Returns {"created", ""}, {"existing", "<batch id> <request hash>"} or {"input_not_found", ""}.
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {'existing', existing} end
end
local fields = cjson.decode(ARGV[7])
if KEYS[5] ~= '' then
  local upload = redis.call('HMGET', KEYS[5], 'owner', 'kind', 'size', 's3_key')
  if upload[1] ~= ARGV[6] or upload[2] ~= 'jsonl' then return {'input_not_found', ''} end
  fields['input_bytes'] = upload[3]
  if upload[4] then
    fields['input_s3_key'] = upload[4]
  elseif redis.call('EXISTS', KEYS[6]) == 1 then
    redis.call('RENAME', KEYS[6], KEYS[7])
  end
  redis.call('DEL', KEYS[5])  -- the batch's now: no other batch can take it, nor can it expire under this one
end
for name, value in pairs(fields) do redis.call('HSET', KEYS[1], name, tostring(value)) end
for i = 9, #ARGV do redis.call('RPUSH', KEYS[7], ARGV[i]) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[1])
redis.call('ZADD', KEYS[8], tonumber(ARGV[8]), ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[5])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[2], 'EX', tonumber(ARGV[3])) end
return {'created', ''}
