-- settle.lua: record the outcome of messages, publish their events, and acknowledge their outbox
-- entries in one atomic step, so a crash never leaves an outcome without its event or entry.
-- KEYS[1]  the lane's outbox stream          KEYS[2]  the status events stream
-- KEYS[3]  the awaiting-report sorted set     KEYS[4]  the dead-letter stream
-- KEYS[4+i] the message hash of the i-th message
-- ARGV[1]  consumer group   ARGV[2]  now in ms   ARGV[3]  events stream max length (approximate)
-- ARGV[4]  state TTL in seconds
-- Then for each message: message id, outbox entry id ("" for none), new state ("" to acknowledge
--   the entry only, see below), "1" to acknowledge and delete the entry (outcome final for the
--   outbox) or "0" to keep it pending, event JSON ("" for none), report deadline in ms ("" for
--   none), dead-letter JSON ("" for none), guard ("" for none, "f:<fence token>" or
--   "c:<checker>" or "p:", see below), campaign spec ("" for none, "1<id>"/"0<id>": see ledger.lua; read only
--   for a message with no record yet, and for an acknowledge-only repeat), the number n of extra
--   hash fields, and then n field/value pairs.
-- A state change is applied only where the transition is allowed (see ALLOWED, which
-- worker.transitions mirrors); otherwise the message keeps its state and no event or dead letter
-- is written, but the entry is still acked. An empty new state is "acknowledge only" (a message
-- settled already, a repeated producer id): nothing is changed or written, the entry is acked,
-- and the answer is 0.
-- A guarded outcome is our own decision about a message (not sent after all, ambiguous, given
-- up), valid only while we still own it: "f:" while its fence is still ours (nobody resent it
-- since), "c:" while we hold its reconciliation lease. A stale owner's guarded outcome changes
-- nothing and leaves the entry to its new owner. Unguarded outcomes are the provider's facts
-- (accepted, rejected) and apply whoever learnt them. "p:" is a traffic-policy rejection decided
-- before any submit: it applies only to a message with no record yet or QUEUED (certainly not sent),
-- never to one another worker may have submitted meanwhile.
-- Every applied change is written to the message's trail (with the ids of its event and dead letter)
-- and moves its campaign's counters. An acknowledge-only entry with a counted campaign spec is a
-- repeat of a producer id the producer API counted at enqueue: it leaves the campaign (uncounted)
-- only if this call is the one that deletes it (the producer's own undo may have, see uncount.lua).
-- Returns, per message, 1 if the change was applied and 0 if not.
--#include ledger
local ALLOWED = {
  SUBMITTING = {QUEUED = true},
  ACCEPTED   = {SUBMITTING = true, AMBIGUOUS = true, QUEUED = true},
  REJECTED   = {NONE = true, SUBMITTING = true, AMBIGUOUS = true, QUEUED = true},
  AMBIGUOUS  = {SUBMITTING = true},
  QUEUED     = {SUBMITTING = true, AMBIGUOUS = true},
  FAILED     = {NONE = true, QUEUED = true, SUBMITTING = true, AMBIGUOUS = true},
}
local outbox, events, awaiting, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, now, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local acks, out, awaits, emitted = {}, {}, {}, false
local t = redis.call('TIME')
local server_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)  -- leases are on this clock
local now_s = ledger_ms_text(server_now)
local at = 5

for i = 5, #KEYS do
  local key = KEYS[i]
  local mid, entry, state, ack = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local event, deadline, dead, guard = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], ARGV[at + 7]
  local spec, n = ARGV[at + 8], tonumber(ARGV[at + 9])
  local h = redis.call('HMGET', key, 'state', 'fence', 'checker', 'check_until', 'trail', 'campaign')
  local current = h[1] or 'NONE'
  local owned = true
  if guard ~= '' then
    local kind, who = string.sub(guard, 1, 1), string.sub(guard, 3)
    if kind == 'f' then
      owned = h[2] == who
    elseif kind == 'p' then
      owned = current == 'NONE' or current == 'QUEUED'
    else
      owned = h[3] == who and tonumber(h[4] or '0') > server_now
    end
  end
  local applied = 0
  if not owned then
    ack = '0'
  elseif state ~= '' and ALLOWED[state] and ALLOWED[state][current] then
    applied = 1
    local line, note
    -- The common line (state and event) in one concatenation: each makes a new Lua string.
    if event ~= '' then
      line = now_s .. ' state to=' .. state .. ' event=' .. redis.call('XADD', events, '*', 'event', event)
      emitted = true
    else
      line = now_s .. ' state to=' .. state
    end
    if deadline ~= '' then
      awaits[#awaits + 1] = deadline
      awaits[#awaits + 1] = mid
    end
    if dead ~= '' then line = line .. ' dlq=' .. redis.call('XADD', dlq, '*', 'message_id', mid, 'entry', dead) end
    for j = at + 10, at + 9 + 2 * n, 2 do
      local name = ARGV[j]
      if name == 'last_error' or name == 'reason' or (name == 'status' and not note) then note = ARGV[j + 1] end
    end
    if note and note ~= '' then line = line .. ' note=' .. string.gsub(string.sub(note, 1, 200), '\n', ' ') end
    redis.call('HSET', key, 'state', state, 'updated_ms', now, 'trail', ledger_trail(h[5], line),
      unpack(ARGV, at + 10, at + 9 + 2 * n))
    local campaign, counted = h[6], false
    if current == 'NONE' then
      -- submit.lua set the TTL when it made the hash; only a hash made here needs one.
      redis.call('EXPIRE', key, ttl)
      campaign, counted = ledger_spec(spec)
      if campaign then redis.call('HSET', key, 'campaign', campaign) end
    end
    ledger_move(key, campaign, current ~= 'NONE' and current or nil, state, counted, ttl)
    if state == 'ACCEPTED' then ledger_count(key, campaign, 'sent', 1, ttl) end
  elseif state == '' and ack == '1' and entry ~= '' and string.sub(spec, 1, 1) == '1' then
    -- A counted repeat: acknowledged and deleted here, one at a time, so it is uncounted only if
    -- this call deleted it.
    redis.call('XACK', outbox, group, entry)
    if redis.call('XDEL', outbox, entry) == 1 then
      local campaign = ledger_spec(spec)
      ledger_move(key, campaign, nil, nil, true, ttl)
    end
    ack = '0'
  end
  out[#out + 1] = applied
  if ack == '1' and entry ~= '' then acks[#acks + 1] = entry end
  at = at + 10 + 2 * n
end

-- The batch's variadic commands, each once per call instead of once per message (the command
-- itself, not its arguments, is most of a small call's cost); chunks keep unpack() under Lua's
-- stack limit.
for i = 1, #awaits, 1000 do
  redis.call('ZADD', awaiting, unpack(awaits, i, math.min(i + 999, #awaits)))
end
if emitted then redis.call('XTRIM', events, 'MAXLEN', '~', maxlen) end
for i = 1, #acks, 1000 do
  local chunk = {unpack(acks, i, math.min(i + 999, #acks))}
  redis.call('XACK', outbox, group, unpack(chunk))
  redis.call('XDEL', outbox, unpack(chunk))
end
ledger_flush()
return out
