-- requeue.lua: a dead letter replayed under its own message id makes the message QUEUED again. It
-- runs inside the replay's MULTI/EXEC (worker.store.deadletters), which appends the new outbox entry
-- and the `requeued` event and deletes the dead letter; this part is a script because the change is
-- also written to the message's trail and moves its campaign's counters from whatever state it left.
-- KEYS[1]  the message hash
-- ARGV[1]  lane   ARGV[2]  job JSON   ARGV[3]  the dead letter's id
--#include ledger
local key = KEYS[1]
local h = redis.call('HMGET', key, 'state', 'trail', 'campaign')
local now = ledger_now()
redis.call('HSET', key, 'state', 'QUEUED', 'lane', ARGV[1], 'job', ARGV[2], 'updated_ms', now,
  'trail', ledger_trail(h[2], now .. ' requeued dlq=' .. ARGV[3]))
ledger_move(key, h[3], h[1], 'QUEUED', false, redis.call('TTL', key))
ledger_flush()
return 1
