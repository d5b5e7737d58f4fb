-- slot.lua: take or renew one of a lane's dispatcher slots, bounding the bulks in flight at once.
-- KEYS[1]  the lane's dispatcher sorted set (member: dispatcher id, score: lease expiry in ms)
-- ARGV[1]  this dispatcher's id
-- ARGV[2]  how many slots the lane has
-- ARGV[3]  lease in ms; a dispatcher that dies frees its slot when the lease runs out
-- Returns 1 if the caller holds a slot now, 0 if all are taken.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, member, limit, lease = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now + lease, member)
  redis.call('PEXPIRE', key, lease * 2)
  return 1
end
return 0
