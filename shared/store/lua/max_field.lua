-- KEYS[1] a hash; ARGV[1] a field, ARGV[2] a number: the field becomes the larger of the two.
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
