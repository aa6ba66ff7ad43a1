-- requires: queue_position
-- A job hash as a flat field/value list, without the queue message a queued job keeps, and for a queued job the
-- jobs ahead of it (queue_position.lua), in one step: {fields, place} (fields empty when there is no such job; place
-- empty unless it is queued, else {ahead, own key only}).
local function read_job(job_key, job_id, templates)
  local fields, kept, job = redis.call('HGETALL', job_key), {}, {}
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name ~= 'message' then
      kept[#kept + 1] = name
      kept[#kept + 1] = value
    end
    if name == 'status' or name == 'queue' or name == 'owner' then job[name] = value end
  end
  if job.status ~= 'queued' or not job.queue then return {kept, {}} end
  return {kept, queue_position(job.queue, job.owner or '', job_id, templates)}
end
