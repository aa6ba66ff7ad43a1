-- requires: token_bucket
-- KEYS[1] bucket key. ARGV: tokens per second, burst.
return take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
