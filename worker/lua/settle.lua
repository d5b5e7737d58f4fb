-- settle.lua: record the outcome of messages, publish their events, and acknowledge their outbox
-- entries in one atomic step, so a crash never leaves an outcome without its event or entry.
-- KEYS[1]  the lane's outbox stream          KEYS[2]  the status events stream
-- KEYS[3]  the awaiting-report sorted set     KEYS[4]  the dead-letter stream
-- KEYS[4+i] the message hash of the i-th message
-- ARGV[1]  consumer group   ARGV[2]  now in ms   ARGV[3]  events stream max length (approximate)
-- ARGV[4]  state TTL in seconds
-- ARGV[4+8i-7..4+8i]  for message i: message id, outbox entry id ("" for none), new state,
--   "1" to acknowledge and delete the entry (outcome final for the outbox) or "0" to keep it
--   pending, event JSON ("" for none), report deadline in ms ("" for none), extra hash fields as
--   a JSON object, dead-letter JSON ("" for none)
-- A state change is applied only where the transition is allowed (see ALLOWED); otherwise the
-- message keeps its state and no event or dead letter is written, but the entry is still acked.
-- Returns, per message, 1 if the change was applied and 0 if not.
local ALLOWED = {
  SUBMITTING = {QUEUED = true},
  ACCEPTED   = {SUBMITTING = true, AMBIGUOUS = true, QUEUED = true},
  REJECTED   = {SUBMITTING = true, AMBIGUOUS = true, QUEUED = true},
  AMBIGUOUS  = {SUBMITTING = true},
  QUEUED     = {SUBMITTING = true, AMBIGUOUS = true},
  FAILED     = {NONE = true, QUEUED = true, SUBMITTING = true, AMBIGUOUS = true},
}
local outbox, events, awaiting, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, now, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local acks, out = {}, {}

for i = 5, #KEYS do
  local key = KEYS[i]
  local base = 4 + (i - 5) * 8
  local mid, entry, state, ack = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local event, deadline, fields, dead = ARGV[base + 5], ARGV[base + 6], ARGV[base + 7], ARGV[base + 8]
  local current = redis.call('HGET', key, 'state') or 'NONE'
  local applied = 0
  if ALLOWED[state] and ALLOWED[state][current] then
    applied = 1
    local args = {'state', state, 'updated_ms', now}
    for k, v in pairs(cjson.decode(fields)) do
      args[#args + 1] = k
      args[#args + 1] = type(v) == 'table' and cjson.encode(v) or tostring(v)
    end
    redis.call('HSET', key, unpack(args))
    redis.call('EXPIRE', key, ttl)
    if event ~= '' then
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', event)
    end
    if deadline ~= '' then redis.call('ZADD', awaiting, deadline, mid) end
    if dead ~= '' then redis.call('XADD', dlq, '*', 'message_id', mid, 'entry', dead) end
  end
  out[#out + 1] = applied
  if ack == '1' and entry ~= '' then acks[#acks + 1] = entry end
end

-- XACK/XDEL take many ids; chunks keep unpack() under Lua's stack limit.
for i = 1, #acks, 1000 do
  local chunk = {unpack(acks, i, math.min(i + 999, #acks))}
  redis.call('XACK', outbox, group, unpack(chunk))
  redis.call('XDEL', outbox, unpack(chunk))
end
return out
