-- schedule.lua: hold jobs in their lane's schedule until their send_at (state SCHEDULED).
-- KEYS[1]  the lane's schedule (sorted set: message id by due ms)
-- KEYS[2]  the lane's outbox stream (only for entries moved here by a dispatcher, see below)
-- KEYS[2+2i-1], KEYS[2+2i]  for job i: its message hash, and its producer-id key (its message
--          hash again when it has no producer id)
-- ARGV[1]  state TTL in seconds (counted from the due time)   ARGV[2]  producer-id TTL in seconds
-- ARGV[3]  the dispatch consumer group   ARGV[4]  the lane
-- ARGV[4+5i-4..4+5i]  for job i: message id, job JSON, due ms, outbox entry id ("" for a producer's
--          call; for a raw outbox entry with a future send_at, the entry to acknowledge and delete),
--          campaign spec (see ledger.lua)
-- Returns, per job, {message id, answer}: answer is
--   "SCHEDULED" (held now), "DUPLICATE" (its producer id is already queued as the message id
--   returned), or for an outbox entry whose message already has a record (the schedule moved it
--   to the outbox when due, or it was cancelled) that record's state: nothing changed, the
--   dispatcher goes on with it as with any entry.
-- One call is all or nothing for its checks and writes; a crash leaves a job either in the
-- schedule with its hash, or (for an entry) still in the outbox.
-- A job held is written to its trail and counted in its campaign.
--#include ledger
local schedule, outbox = KEYS[1], KEYS[2]
local ttl, idem_ttl, group, lane = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local key, idem = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local base = 4 + (i - 1) * 5
  local mid, job, due, entry = ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3]), ARGV[base + 4]
  local campaign, counted = ledger_spec(ARGV[base + 5])
  local state = redis.call('HGET', key, 'state')
  local left = math.max(0, math.ceil((due - now) / 1000))
  local earlier = false
  if not state and idem ~= key then
    -- The producer id is kept until the job is due plus the usual window, so a repeat is refused
    -- (and a cancel by producer id finds it) however far ahead it was scheduled.
    earlier = redis.call('SET', idem, mid, 'NX', 'GET', 'EX', idem_ttl + left)
    if earlier == mid then  -- an entry whose id the dispatcher claimed for it: keep the claim as long
      redis.call('EXPIRE', idem, idem_ttl + left)
      earlier = false
    end
  end
  if state then
    out[i] = {mid, state}
  elseif earlier then
    out[i] = {earlier, 'DUPLICATE'}
  else
    redis.call('HSET', key, 'state', 'SCHEDULED', 'lane', lane, 'job', job,
      'due_ms', due, 'attempts', 0, 'first_ms', now, 'updated_ms', now,
      'trail', now .. ' scheduled due=' .. ARGV[base + 3] .. (entry ~= '' and (' entry=' .. entry) or ''))
    if campaign then redis.call('HSET', key, 'campaign', campaign) end
    redis.call('EXPIRE', key, ttl + left)
    ledger_move(key, campaign, nil, 'SCHEDULED', counted, ttl + left)
    redis.call('ZADD', schedule, due, mid)
    out[i] = {mid, 'SCHEDULED'}
  end
  -- An entry now held in the schedule (or a repeat) leaves the outbox; one whose message has a
  -- record stays for the dispatcher.
  if entry ~= '' and (out[i][2] == 'SCHEDULED' or out[i][2] == 'DUPLICATE') then
    redis.call('XACK', outbox, group, entry)
    -- A counted repeat leaves its campaign (only if deleted here: see settle.lua).
    if redis.call('XDEL', outbox, entry) == 1 and out[i][2] == 'DUPLICATE' and counted then
      ledger_move(key, campaign, nil, nil, true, ttl)
    end
  end
end
ledger_flush()
return out
