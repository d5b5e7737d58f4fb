-- ratelimit.lua: grant at most N tokens from several GCRA buckets at once, on the server's clock.
-- KEYS[i]  the i-th bucket (holds its theoretical arrival time, TAT, in microseconds)
-- ARGV[1]  N, the most tokens wanted (messages)
-- ARGV[1+3i-2..1+3i]  for bucket i: rate in tokens/s, burst in tokens, cost kind
--   ("messages": each granted message costs one token; "request": the call costs one token)
-- Returns {granted, wait_ms}: granted is the largest n <= N every bucket allows now (0 if none);
-- when 0, wait_ms is how long until at least one message and one request would be allowed.
-- Every bucket is charged for what was granted, atomically, so processes on any host share it.
local want = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local grant, wait_us = want, 0
local buckets = {}

for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 3
  local rate, burst, kind = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  local interval = 1000000 / rate
  local tolerance = burst * interval
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  -- Tokens available now: how many intervals fit between now + tolerance and the TAT.
  local available = math.floor((now + tolerance - tat) / interval)
  if kind == 'request' then
    if available < 1 then
      grant = 0
      wait_us = math.max(wait_us, tat + interval - tolerance - now)
    end
  else
    if available < grant then grant = math.max(available, 0) end
    if available < 1 then wait_us = math.max(wait_us, tat + interval - tolerance - now) end
  end
  buckets[i] = {key, tat, interval, kind, tolerance}
end

if grant > 0 then
  for _, b in ipairs(buckets) do
    local cost = b[4] == 'request' and 1 or grant
    local tat = b[2] + cost * b[3]
    -- The key lives as long as it matters: until the bucket is full again.
    redis.call('SET', b[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  return {grant, 0}
end
return {0, math.max(1, math.ceil(wait_us / 1000))}
