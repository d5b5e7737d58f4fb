-- submit.lua: record that messages are about to be POSTed (state SUBMITTING) before the request.
-- KEYS[i]  the message hash of the i-th message
-- ARGV[1]  now in ms
-- ARGV[2]  state TTL in seconds
-- ARGV[3]  this consumer's name
-- ARGV[4]  lease in ms for a reconciliation (see below)
-- ARGV[4+3i-2..4+3i]  for message i: lane, outbox entry id, job JSON
-- Returns, per message, {previous state, attempts}:
--   new or QUEUED      -> moved to SUBMITTING, one more attempt counted; the caller sends it.
--   SUBMITTING or AMBIGUOUS -> a previous attempt may have reached the provider; the caller
--                         reconciles it. Only one consumer at a time: the first takes a
--                         reconciliation lease, others get BUSY and leave the entry alone.
--   any other state    -> returned as it is; the caller only acknowledges the entry.
local now, ttl, me, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local out = {}
for i, key in ipairs(KEYS) do
  local base = 4 + (i - 1) * 3
  local current = redis.call('HMGET', key, 'state', 'attempts')
  local state, attempts = current[1], tonumber(current[2] or '0')
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
  elseif state == 'SUBMITTING' or state == 'AMBIGUOUS' then
    local holder = redis.call('HMGET', key, 'checker', 'check_until')
    if holder[1] and holder[1] ~= me and tonumber(holder[2]) > now then
      out[i] = {'BUSY', attempts}
    else
      redis.call('HSET', key, 'checker', me, 'check_until', now + lease)
      out[i] = {state, attempts}
    end
  else
    out[i] = {state, attempts}
  end
end
return out
