-- lease.lua: take or renew a named lease (one holder across all hosts), with a fencing token.
-- KEYS[1]  the lease key (value: the holder's id)
-- KEYS[2]  the fencing counter, incremented each time the lease changes hands
-- ARGV[1]  the caller's id
-- ARGV[2]  lease length in ms
-- Returns the fencing token (> 0) while the caller holds the lease, 0 if someone else does.
-- Writes guarded by the lease compare their token with the counter, so a holder that paused past
-- its lease (and was replaced) cannot write any more.
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return 0
