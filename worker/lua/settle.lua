-- settle.lua: record the outcome of messages, publish their events, and acknowledge their outbox
-- entries in one atomic step, so a crash never leaves an outcome without its event or entry.
-- KEYS[1]  the lane's outbox stream          KEYS[2]  the status events stream
-- KEYS[3]  the awaiting-report sorted set     KEYS[4]  the dead-letter stream
-- KEYS[4+i] the message hash of the i-th message
-- ARGV[1]  consumer group   ARGV[2]  now in ms   ARGV[3]  events stream max length (approximate)
-- ARGV[4]  state TTL in seconds
-- Then for each message: message id, outbox entry id ("" for none), new state, "1" to acknowledge
--   and delete the entry (outcome final for the outbox) or "0" to keep it pending, event JSON
--   ("" for none), report deadline in ms ("" for none), dead-letter JSON ("" for none), the
--   number n of extra hash fields, and then n field/value pairs.
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
local at = 5

for i = 5, #KEYS do
  local key = KEYS[i]
  local mid, entry, state, ack = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local event, deadline, dead, n = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], tonumber(ARGV[at + 7])
  local current = redis.call('HGET', key, 'state') or 'NONE'
  local applied = 0
  if ALLOWED[state] and ALLOWED[state][current] then
    applied = 1
    redis.call('HSET', key, 'state', state, 'updated_ms', now, unpack(ARGV, at + 8, at + 7 + 2 * n))
    -- submit.lua set the TTL when it made the hash; only a hash made here needs one.
    if current == 'NONE' then redis.call('EXPIRE', key, ttl) end
    if event ~= '' then
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', event)
    end
    if deadline ~= '' then redis.call('ZADD', awaiting, deadline, mid) end
    if dead ~= '' then redis.call('XADD', dlq, '*', 'message_id', mid, 'entry', dead) end
  end
  out[#out + 1] = applied
  if ack == '1' and entry ~= '' then acks[#acks + 1] = entry end
  at = at + 8 + 2 * n
end

-- XACK/XDEL take many ids; chunks keep unpack() under Lua's stack limit.
for i = 1, #acks, 1000 do
  local chunk = {unpack(acks, i, math.min(i + 999, #acks))}
  redis.call('XACK', outbox, group, unpack(chunk))
  redis.call('XDEL', outbox, unpack(chunk))
end
return out
