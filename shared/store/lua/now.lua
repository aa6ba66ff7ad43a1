-- Server time in seconds, as a float: every schedule is on the clock every process shares.
local function now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
