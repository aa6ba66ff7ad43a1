-- requires: queue_position
-- A job hash as a flat field/value list, without the queue message a queued job keeps, and for a queued job where
-- it stands (queue_position.lua), in one step: {fields, place} (fields empty when there is no such job; place
-- empty unless it is queued).
local function read_job(job_key, job_id, templates, live_since)
  local fields, kept, queued = redis.call('HGETALL', job_key), {}, false
  for i = 1, #fields, 2 do
    if fields[i] ~= 'message' then
      kept[#kept + 1] = fields[i]
      kept[#kept + 1] = fields[i + 1]
    end
    if fields[i] == 'status' and fields[i + 1] == 'queued' then queued = true end
  end
  if not queued then return {kept, {}} end
  return {kept, queue_position(job_key, job_id, templates, live_since)}
end
