-- enqueue.lua: append jobs to one lane's outbox, refusing producer ids seen within the retention.
-- KEYS[1]  the lane's outbox stream
-- KEYS[2..] the idempotency keys of the jobs that carry a producer id, in job order
-- ARGV[1]  idempotency retention in seconds
-- ARGV[2]  message id prefix for this lane (the message id is the prefix and the entry id)
-- ARGV[3..] for each job: its JSON, then the index in KEYS of its idempotency key ("0" for none)
-- Returns, per job, {message id, 1 if newly queued or 0 if a duplicate of an earlier job}.
local stream, ttl, prefix = KEYS[1], ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local job, k = ARGV[i], tonumber(ARGV[i + 1])
  local earlier = k > 0 and redis.call('GET', KEYS[k])
  if earlier then
    out[#out + 1] = {earlier, 0}
  else
    local id = redis.call('XADD', stream, '*', 'job', job, 'src', 'api')
    local mid = prefix .. id
    if k > 0 then redis.call('SET', KEYS[k], mid, 'EX', ttl) end
    out[#out + 1] = {mid, 1}
  end
end
return out
