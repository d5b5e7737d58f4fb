-- ratelimit_refund.lua: give back tokens granted by ratelimit.lua but not used (a claim found
-- fewer jobs than were granted), so partial batches do not waste the shared rate.
-- KEYS[i]  the i-th bucket (TAT in microseconds)
-- ARGV[1]  unused messages
-- ARGV[2]  "1" if the request itself was not made (refund the request token too), else "0"
-- ARGV[2+2i-1..2+2i]  for bucket i: rate in tokens/s, cost kind ("messages" or "request")
-- Returns nothing useful; a bucket never goes back before the server's current time.
local unused, request = tonumber(ARGV[1]), ARGV[2] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local rate, kind = tonumber(ARGV[1 + 2 * i]), ARGV[2 + 2 * i]
  local cost = kind == 'request' and (request and 1 or 0) or unused
  local tat = tonumber(redis.call('GET', key) or '0')
  if cost > 0 and tat > now then
    local back = math.max(now, tat - cost * 1000000 / rate)
    redis.call('SET', key, string.format('%.0f', back), 'KEEPTTL')
  end
end
return 0
