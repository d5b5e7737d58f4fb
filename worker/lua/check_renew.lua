-- check_renew.lua: keep a reconciler's lease alive while it waits for logs calls, so a long check
-- (the logs endpoint allows ~2 calls/s) is not handed to a second reconciler half-way.
-- KEYS[i]  the message hash of the i-th message being checked
-- ARGV[1]  this consumer's name (the checker)
-- ARGV[2]  lease in ms from now
-- Returns the number of leases renewed (a message whose lease was lost is not taken back: its new
-- checker owns it, and absent.lua will answer STALE for it).
local me, lease = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = 0
for _, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'checker', 'check_until')
  if h[1] == me and tonumber(h[2] or '0') > now then
    redis.call('HSET', key, 'check_until', now + lease)
    renewed = renewed + 1
  end
end
return renewed
