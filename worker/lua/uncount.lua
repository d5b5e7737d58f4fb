-- uncount.lua: delete outbox entries the producer API counted in their campaign at enqueue (field
-- `c`) and take them out of its counters again: an entry repeating a producer id, or one half of a
-- job Redis half wrote (worker/store/outbox.py, `_undo`). The counters follow the entry, not the
-- caller: an entry is uncounted only by the call whose XDEL actually deleted it, so a retried undo
-- or a dispatcher deleting the same repeat never uncounts it twice.
-- KEYS[1]  the lane's outbox stream
-- KEYS[1+i]  for entry i: its campaign's counter hash ({p}:campaign:{id})
-- ARGV[i]  entry i's stream id
-- Returns the number of entries deleted (and uncounted).
-- No shebang flags on purpose: in Redis's compatibility mode a script that has written (the XDEL)
-- may go on writing when Redis is out of memory, so an entry deleted is always uncounted, and the
-- XDEL itself (no memory needed) runs under noeviction like the plain XDEL it replaces.
local outbox = KEYS[1]
local deleted = 0
for i = 1, #ARGV do
  if redis.call('XDEL', outbox, ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[1 + i], 'total', -1)
    redis.call('HINCRBY', KEYS[1 + i], 'queued', -1)
    deleted = deleted + 1
  end
end
return deleted
