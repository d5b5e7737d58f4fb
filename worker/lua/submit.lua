-- submit.lua: record that messages are about to be POSTed (state SUBMITTING) before the request.
-- KEYS[i]  the message hash of the i-th message
-- ARGV[1]  now in ms
-- ARGV[2]  state TTL in seconds
-- ARGV[2+3i-2..2+3i]  for message i: lane, outbox entry id, job JSON
-- Returns, per message, {previous state, attempts after this call}. A message found QUEUED or new
-- moves to SUBMITTING and counts an attempt; one found SUBMITTING or AMBIGUOUS is left for
-- reconciliation (a previous attempt may have reached the provider); any other state is returned
-- as it is so the caller only acknowledges the entry.
local now, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 3
  local state = redis.call('HGET', key, 'state')
  local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0')
  if not state then
    redis.call('HSET', key, 'state', 'SUBMITTING', 'lane', ARGV[base + 1], 'entry', ARGV[base + 2],
      'job', ARGV[base + 3], 'attempts', 1, 'first_ms', now, 'updated_ms', now)
    redis.call('EXPIRE', key, ttl)
    out[i] = {'NEW', 1}
  elseif state == 'QUEUED' then
    attempts = attempts + 1
    redis.call('HSET', key, 'state', 'SUBMITTING', 'entry', ARGV[base + 2], 'attempts', attempts,
      'updated_ms', now)
    redis.call('EXPIRE', key, ttl)
    out[i] = {'QUEUED', attempts}
  else
    out[i] = {state, attempts}
  end
end
return out
