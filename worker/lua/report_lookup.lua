-- report_lookup.lua: claim accepted messages due for a look in GET /sms/3/logs (the sweep's early
-- lookup of reports that never came), so two sweeps running at once never look one up twice.
-- KEYS[1]  the lookup schedule, sorted set (messageId -> when its next lookup is due, ms)
-- KEYS[2]  lookups made so far, hash (messageId -> count)
-- ARGV[1]  now in ms   ARGV[2]  claimed until (ms): a lookup that never finished (a crash, the
--          provider down) is due again then; the caller reschedules the others with backoff
-- ARGV[3..] the messageIds to claim
-- Returns, per messageId, its number of lookups counting this one, or 0 when it is not due (any
-- more): claimed by another sweep meanwhile, or gone from the schedule.
local schedule, tries = KEYS[1], KEYS[2]
local now, claimed_until = tonumber(ARGV[1]), ARGV[2]
local out = {}
for i = 3, #ARGV do
  local mid = ARGV[i]
  local due = redis.call('ZSCORE', schedule, mid)
  if due and tonumber(due) <= now then
    redis.call('ZADD', schedule, 'XX', claimed_until, mid)
    out[#out + 1] = redis.call('HINCRBY', tries, mid, 1)
  else
    out[#out + 1] = 0
  end
end
return out
