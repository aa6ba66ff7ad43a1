-- A token bucket per API key, as GCRA: the bucket is one number, the theoretical arrival time of the next
-- request, so a request costs one GET and one SET (with its expiry) on the server's clock, which every API process
-- shares. Returns "0" when a request may go ahead, else the seconds until one may.
local function take_token(bucket_key, rate, burst)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local interval = 1 / rate
  local tat = math.max(tonumber(redis.call('GET', bucket_key) or now), now)
  local allowed_at = tat + interval - burst * interval
  if allowed_at > now then return tostring(allowed_at - now) end
  redis.call('SET', bucket_key, tostring(tat + interval), 'PX', math.ceil((tat + interval - now) * 1000) + 1)
  return '0'
end
