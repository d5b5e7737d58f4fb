-- report_fetch.lua: read what report processing needs from many message hashes in one call.
-- KEYS[i]  the message hash of the i-th message
-- ARGV     none
-- Returns, per message, {state, reason, job, lane, bulk_id, campaign}; a missing field (or hash) is nil.
-- One script instead of a pipeline of HMGETs: one command to encode for a 1000-report page.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'state', 'reason', 'job', 'lane', 'bulk_id', 'campaign')
end
return out
