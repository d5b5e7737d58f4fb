-- due.lua: move a lane's scheduled jobs whose time has come to its outbox, each atomically.
-- KEYS[1]  the lane's schedule (sorted set: message id by due ms)   KEYS[2]  the lane's outbox
-- ARGV[1]  the message hash key prefix ("{p}:msg:")   ARGV[2]  the most jobs to move
-- ARGV[3]  state TTL in seconds
-- Time is the server's (TIME). A SCHEDULED message becomes QUEUED and its job is appended to the
-- outbox with its message id (field `mid`); a member whose message is no longer SCHEDULED
-- (cancelled, or its record expired) is only removed. The append, the state change and the
-- removal happen in this one call, so a crash never loses a job or moves it twice, and two movers
-- at once are serialised by Redis: the second finds nothing left to move.
-- Each move is written to the message's trail and moves its campaign's counters.
-- Returns {moved, next due ms or -1 when the schedule is empty}.
--#include ledger
local schedule, outbox = KEYS[1], KEYS[2]
local prefix, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = 0
for _, mid in ipairs(redis.call('ZRANGE', schedule, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
  local key = prefix .. mid
  local h = redis.call('HMGET', key, 'state', 'job', 'trail', 'campaign')
  if h[1] == 'SCHEDULED' and h[2] then
    local entry = redis.call('XADD', outbox, '*', 'job', h[2], 'mid', mid)
    redis.call('HSET', key, 'state', 'QUEUED', 'entry', entry, 'updated_ms', now,
      'trail', ledger_trail(h[3], now .. ' queued entry=' .. entry))
    redis.call('EXPIRE', key, ttl)
    ledger_move(key, h[4], 'SCHEDULED', 'QUEUED', false, ttl)
    moved = moved + 1
  end
  redis.call('ZREM', schedule, mid)
end
ledger_flush()
local first = redis.call('ZRANGE', schedule, 0, 0, 'WITHSCORES')
return {moved, first[2] and tonumber(first[2]) or -1}
