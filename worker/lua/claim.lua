-- claim.lua: hand up to N outbox entries of one lane to one consumer, recovering stale ones first.
-- KEYS[1]  the lane's outbox stream
-- KEYS[2]  the lane's pause key: while it exists nothing is claimed
-- ARGV[1]  consumer group name
-- ARGV[2]  consumer name
-- ARGV[3]  N, the most entries to return (already sized to the rate limiter's grant)
-- ARGV[4]  lease in ms: entries pending longer than this belong to a dead or stuck consumer
-- ARGV[5]  max wait in ms: a partial batch is only taken once its oldest entry is this old
-- ARGV[6]  "1" to look for stale pending entries first (callers do it now and then, not every time)
-- Returns {kind, wait_ms, id1, fields1, id2, fields2, ...}; kind is
--   "paused" (the lane is paused), "recovered" (entries taken over from the pending list), "new",
--   "wait" (a partial batch is younger than the max wait; wait_ms says for how long), or "empty",
--   which comes as
--   {"empty", 0, last id}: the stream's last generated id, after which any entry is new to the
--   group, so a caller can block on XREAD for it without missing one added meanwhile.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n, lease_ms, max_wait_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

local function flatten(kind, wait_ms, entries)
  local out = {kind, wait_ms}
  for _, e in ipairs(entries) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2]
  end
  return out
end

if redis.call('EXISTS', KEYS[2]) == 1 then return {'paused', 0} end

-- The group is made on first use from the start of the stream, so entries that producers wrote
-- with plain XADD before any worker ran are not skipped.
local ok = pcall(redis.call, 'XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')

local function empty()
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return {'empty', 0, info[i + 1]} end
  end
  return {'empty', 0, '0-0'}
end

if ARGV[6] == '1' then
  local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, lease_ms, '0-0', 'COUNT', n)
  local live = {}
  for _, e in ipairs(claimed[2]) do
    if e[2] then live[#live + 1] = e end  -- an entry deleted while pending comes back as nil fields
  end
  if #live > 0 then return flatten('recovered', 0, live) end
end

if max_wait_ms > 0 then
  local info = redis.call('XINFO', 'GROUPS', stream)
  local last_id, lag = '0-0', false
  for _, g in ipairs(info) do
    local fields = {}
    for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
    if fields['name'] == group then
      last_id = fields['last-delivered-id']
      lag = fields['lag']
    end
  end
  if not lag or lag < n then
    local head = redis.call('XRANGE', stream, '(' .. last_id, '+', 'COUNT', n)
    if #head == 0 then return empty() end
    if #head < n then
      local now = redis.call('TIME')
      local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
      local oldest_ms = tonumber(string.match(head[1][1], '^(%d+)'))
      local age = now_ms - oldest_ms
      if age < max_wait_ms then return {'wait', max_wait_ms - age} end
    end
  end
end

local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, '>')
if not read then return empty() end
return flatten('new', 0, read[1][2])
