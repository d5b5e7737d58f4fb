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
-- Returns {"CANCELLED"}; {"CHANGED", state or "NONE"} when the state is no longer the one read
-- (the caller reads again); {"GONE"} for NONE when the entry has left the outbox.
local key, events, schedule, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expected, mid, lane, entry, job = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local event, maxlen, ttl = ARGV[6], ARGV[7], tonumber(ARGV[8])
local state = redis.call('HGET', key, 'state') or 'NONE'
if state ~= expected then return {'CHANGED', state} end
if state ~= 'SCHEDULED' and state ~= 'QUEUED' and state ~= 'NONE' then return {'CHANGED', state} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if state == 'NONE' then
  if #redis.call('XRANGE', outbox, entry, entry) == 0 then return {'GONE'} end
  redis.call('HSET', key, 'lane', lane, 'entry', entry, 'job', job, 'attempts', 0, 'first_ms', now)
end
-- The outbox entry of a QUEUED or unrecorded message stays: the dispatcher that claims it gets
-- SETTLED from submit.lua and only acknowledges it (deleting here would race with its claim).
redis.call('ZREM', schedule, mid)
redis.call('HSET', key, 'state', 'CANCELLED', 'updated_ms', now, 'cancelled_ms', now)
redis.call('EXPIRE', key, ttl)
redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'event', event)
return {'CANCELLED'}
