-- cancel.lua: cancel one message that was never submitted, deciding the race with the dispatcher
-- in one atomic step: either this call finds it SCHEDULED, QUEUED or unrecorded (still in the
-- outbox) and it becomes CANCELLED, so submit.lua later answers SETTLED and it is never POSTed;
-- or it finds another state and changes nothing.
-- KEYS[1]  the message hash   KEYS[2]  the status events stream   KEYS[3]  the lane's schedule
-- KEYS[4]  the lane's outbox stream
-- ARGV[1]  the state the caller read ("NONE" for no record): the event was built from that read
-- ARGV[2]  message id   ARGV[3]  lane   ARGV[4]  outbox entry id ("" unless ARGV[1] is NONE)
-- ARGV[5]  job JSON (for NONE)   ARGV[6]  the `cancelled` event JSON
-- ARGV[7]  events stream max length (approximate)   ARGV[8]  state TTL in seconds
-- ARGV[9]  the job's campaign id ("" for none; an entry the producer API counted names it in `c`)
-- A cancel is written to the message's trail and moves its campaign's counters.
--#include ledger
-- Returns {"CANCELLED"}; {"CHANGED", state or "NONE"} when the state is no longer the one read
-- (the caller reads again); {"GONE"} for NONE when the entry has left the outbox.
local key, events, schedule, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expected, mid, lane, entry, job = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local event, maxlen, ttl = ARGV[6], ARGV[7], tonumber(ARGV[8])
local h = redis.call('HMGET', key, 'state', 'trail', 'campaign')
local state, campaign, counted = h[1] or 'NONE', h[3], false
if state ~= expected then return {'CHANGED', state} end
if state ~= 'SCHEDULED' and state ~= 'QUEUED' and state ~= 'NONE' then return {'CHANGED', state} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if state == 'NONE' then
  local found = redis.call('XRANGE', outbox, entry, entry)
  if #found == 0 then return {'GONE'} end
  local fields = found[1][2]
  campaign = ARGV[9]
  for i = 1, #fields, 2 do
    if fields[i] == 'c' then campaign, counted = fields[i + 1], true end
  end
  redis.call('HSET', key, 'lane', lane, 'entry', entry, 'job', job, 'attempts', 0, 'first_ms', now)
  if campaign ~= '' then redis.call('HSET', key, 'campaign', campaign) end
end
-- The outbox entry of a QUEUED or unrecorded message stays: the dispatcher that claims it gets
-- SETTLED from submit.lua and only acknowledges it (deleting here would race with its claim).
redis.call('ZREM', schedule, mid)
local event_id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', event)
redis.call('HSET', key, 'state', 'CANCELLED', 'updated_ms', now, 'cancelled_ms', now,
  'trail', ledger_trail(h[2], now .. ' cancelled event=' .. event_id))
redis.call('EXPIRE', key, ttl)
ledger_move(key, campaign, state ~= 'NONE' and state or nil, 'CANCELLED', counted, ttl)
ledger_flush()
return {'CANCELLED'}
