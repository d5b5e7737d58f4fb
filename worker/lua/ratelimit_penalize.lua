-- ratelimit_penalize.lua: push every bucket back after the provider answered 429, so every
-- process pauses, not only the one that was refused.
-- KEYS[i]  the i-th bucket (TAT in microseconds, as ratelimit.lua keeps it)
-- ARGV[1]  how long to pause, in ms
-- ARGV[1+2i-1..1+2i]  for bucket i: rate in tokens/s, burst in tokens
-- Returns the pause applied in ms.
local pause_us = tonumber(ARGV[1]) * 1000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tolerance = burst * 1000000 / rate
  -- Nothing is allowed until now + pause: the TAT must sit a full tolerance beyond that.
  local target = now + pause_us + tolerance
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < target then
    redis.call('SET', key, string.format('%.0f', target), 'PX', math.ceil((target - now) / 1000) + 1000)
  end
end
return tonumber(ARGV[1])
