-- requires: now, fill
-- The webhook outbox, written by the terminal transition itself, so that an ended job's event exists exactly
-- when its end does (a worker killed right after still leaves it to send; a second transition never comes).
-- One delivery per webhook that wants the event: the job's own (id "job") and the owner's registered endpoints
-- (id = endpoint id). Each is a hash (the delivery key template filled with its id; its attempts in <that>:log),
-- listed in the job's deliveries list, and due now in the due zset (member "<job id> <delivery id>"); then one
-- dispatch message goes on the webhook queue so that a delivery worker moves them to its queue at once. A batch's
-- end uses the same outbox (notify_batch.lua), with its own event, event id and body; a batch item that did not ask
-- for per-item events (field quiet) sends none to the owner's endpoints.
local function wants(events, event)
  if events == nil or events == cjson.null then return true end
  for _, name in ipairs(events) do
    if name == event then return true end
  end
  return false
end

local function webhook_targets(job_key, event, endpoints_key)
  local targets = {}
  local hook = redis.call('HGET', job_key, 'webhook')
  if hook then
    local spec = cjson.decode(hook)
    if wants(spec.events, event) then table.insert(targets, {'job', spec.url, ''}) end
  end
  if endpoints_key and redis.call('HGET', job_key, 'quiet') ~= '1' then
    for _, raw in ipairs(redis.call('HVALS', endpoints_key)) do
      local endpoint = cjson.decode(raw)
      if wants(endpoint.events, event) then table.insert(targets, {endpoint.id, endpoint.url, endpoint.id}) end
    end
  end
  return targets
end

-- outbox: {job_key, job_id, status, owner, endpoints_key (nil without an owner), delivery_template,
-- deliveries_key, due_key, queue, message, ttl}; a batch's also event, event_id, delivery_suffix and payload.
local function write_outbox(outbox)
  local event = outbox.event or ('job.' .. outbox.status)
  local targets = webhook_targets(outbox.job_key, event, outbox.endpoints_key)
  if #targets == 0 then return end
  local at = tostring(now())
  for _, target in ipairs(targets) do
    local id = target[1] .. (outbox.delivery_suffix or '')
    local key = fill(outbox.delivery_template, 'delivery', id)
    redis.call('HSET', key, 'id', id, 'event_id', outbox.event_id or ('msg_' .. outbox.job_id), 'type', event,
               'url', target[2], 'endpoint_id', target[3], 'owner', outbox.owner or '', 'status', 'pending',
               'created_at', at, 'schedule_start', at, 'next_at', at, 'lease_until', '0', 'attempts', '0')
    if outbox.payload then redis.call('HSET', key, 'payload', outbox.payload) end
    redis.call('EXPIRE', key, outbox.ttl)
    redis.call('RPUSH', outbox.deliveries_key, id)
    redis.call('ZADD', outbox.due_key, at, outbox.job_id .. ' ' .. id)
  end
  redis.call('EXPIRE', outbox.deliveries_key, outbox.ttl)
  redis.call('LPUSH', outbox.queue, outbox.message)
end
