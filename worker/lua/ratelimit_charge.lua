-- ratelimit_charge.lua: charge the message buckets for SMS parts beyond one per message. ratelimit.lua
-- grants one token per message before the claim (how many parts the claimed jobs have is known only
-- after); a batch with multi-part texts then owes the difference, charged here so later grants wait
-- for it. The provider's limits count parts, so the shared rate does too; a batch overshoots by at
-- most its own extra parts, never more, and every process pays the debt together.
-- KEYS[i]  the i-th message bucket (TAT in microseconds, as ratelimit.lua keeps it)
-- ARGV[1]  extra tokens (parts beyond one per message)
-- ARGV[1+i]  bucket i's rate in tokens/s
-- Returns the extra tokens charged.
local extra = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local interval = 1000000 / tonumber(ARGV[1 + i])
  local tat = math.max(now, tonumber(redis.call('GET', key) or '0')) + extra * interval
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return extra
