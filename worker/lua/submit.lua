-- submit.lua: record that messages are about to be POSTed (state SUBMITTING) before the request,
-- under a fence: the batch may write its request only while its fence key lives.
-- KEYS[1]  the batch's fence key (set here, PX = send window, when a message moves to SUBMITTING)
-- KEYS[1+i] the message hash of the i-th message
-- ARGV[1]  state TTL in seconds
-- ARGV[2]  this consumer's name
-- ARGV[3]  lease in ms for a reconciliation (see below)
-- ARGV[4]  the batch's fence token
-- ARGV[5]  send window in ms: the request may be written until now + this, never after
-- ARGV[6]  margin in ms a takeover adds to a SUBMITTING message's send_by before reconciling it
-- ARGV[7]  how many arguments of the lane's counted guards follow (0: none; 13: see guards.lua)
-- then for message i, four fields: lane, outbox entry id, job JSON, campaign spec ("" for none,
--          "1<id>" counted at enqueue, "0<id>" not: see ledger.lua); with guards, four more
--          (guards.lua).
-- Time is the server's (TIME), so every host's deadlines are on one clock.
-- Returns {head, answers}: head is the guards' (guards.lua; empty without guards), answers one
-- {answer, attempts, wait ms} per message:
--   NEW (no record yet) or QUEUED -> moved to SUBMITTING with fence = the token and
--                    send_by = now + window, one more attempt counted; the caller sends it.
--   WAIT          -> SUBMITTING and its owner may still write the request (send_by + margin is in
--                    the future): nobody may look at the logs yet; wait ms says for how long.
--   SUBMITTING or AMBIGUOUS -> a previous attempt may have reached the provider; the caller
--                    reconciles it. Only one consumer at a time: the first takes a reconciliation
--                    lease (checker, check_until), others get BUSY and leave the entry alone.
--   SETTLED       -> any other state (the message was settled already, e.g. a report raced ahead):
--                    nothing changed; the caller only acknowledges the entry.
--   NUMBER, PREFIX -> a fresh message over a velocity rule: not recorded, not counted (rejected);
--   CAMPAIGN      -> a fresh message whose campaign is at its daily cap: not recorded (held);
--   BUDGET        -> every message of a call that found the lane or its account at a daily cap;
--   GUARD_ERROR   -> every message of a call whose guards could not be read, on a lane that fails
--                    closed: nothing recorded (held).
-- (worker.store.SubmitAnswer names these answers; worker.transitions lists the state changes.)
-- Every state change moves the message's campaign counters. Later submits and leases taken are
-- written to its trail; the first submit is the record itself (first_ms, first_by, fence, entry), so
-- the common path builds no text: that cost more Redis time per message than the rest of the ledger.
--#include ledger
--#include guards
local ttl, me, lease, token = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local window, margin = tonumber(ARGV[5]), tonumber(ARGV[6])
local guarded = ARGV[7] ~= '0'
local first, per = 8 + tonumber(ARGV[7]), guarded and 8 or 4  -- message 1's first field; fields per message
local function at(i) return first - 1 + (i - 2) * per end  -- the ARGV index before message i's fields
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Numbers every message writes, turned into text once per call: Redis formats a Lua number it is
-- given with snprintf, and per message that was a tenth of this script's time.
local now_s, send_by_s, ttl_s = ledger_ms_text(now), ledger_ms_text(now + window), ARGV[1]
-- Every message's record first: the guards need to know which messages are fresh, and every read of
-- their state comes before any write. A message named twice in one call (two outbox entries of one
-- message id) is read again when its second turn comes, after its first was recorded, as one call
-- per message would find it; the guards neither count it twice nor let it past a refusal.
local records, first_of, again = {}, {}, {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if first_of[key] then
    again[i] = first_of[key]
    records[i] = {'REPEAT'}  -- not fresh: the guards leave it to its first turn
  else
    first_of[key] = i
    records[i] = redis.call('HMGET', key, 'state', 'attempts', 'send_by', 'updated_ms')
  end
end
local out, fenced, refused = {}, false, {}
local g = guarded and guards_decide(records, now, function(i) return at(i) + 4 end) or nil
if g then
  if g.reached or (g.error and ARGV[20] ~= 'open') then
    -- A cap reached already, or guards that could not decide on a lane that fails closed: the
    -- whole call waits, nothing recorded.
    local answer = g.reached and 'BUDGET' or 'GUARD_ERROR'
    for i = 2, #KEYS do out[i - 1] = {answer, 0, 0} end
    return {guards_refused(g), out}
  end
  refused = g.refused
end
for i = 2, #KEYS do
  local key = KEYS[i]
  local base = at(i)
  if again[i] then
    refused[i] = refused[again[i]]
    records[i] = redis.call('HMGET', key, 'state', 'attempts', 'send_by', 'updated_ms')
  end
  local current = records[i]
  local state, attempts, trail = current[1], tonumber(current[2] or '0'), nil
  local entry = ARGV[base + 2]
  if state then
    -- Only a message seen before has a trail or a campaign to read: the first submit (nearly every
    -- message) reads four fields, not six.
    local more = redis.call('HMGET', key, 'trail', 'campaign')
    trail, current[6] = more[1], more[2]
  end
  if refused[i] then
    out[i - 1] = {refused[i], 0, 0}  -- refused by a guard: not recorded
  elseif not state then
    redis.call('HSET', key, 'state', 'SUBMITTING', 'lane', ARGV[base + 1], 'entry', entry,
      'job', ARGV[base + 3], 'attempts', '1', 'first_ms', now_s, 'updated_ms', now_s,
      'fence', token, 'send_by', send_by_s, 'first_by', me)
    redis.call('EXPIRE', key, ttl_s)
    local spec = ARGV[base + 4]
    if spec ~= '' then
      local campaign, counted = ledger_spec(spec)
      redis.call('HSET', key, 'campaign', campaign)
      ledger_move(key, campaign, nil, 'SUBMITTING', counted, ttl)
    end
    out[i - 1] = {'NEW', 1, 0}
    fenced = true
  elseif state == 'QUEUED' then
    attempts = attempts + 1
    redis.call('HSET', key, 'state', 'SUBMITTING', 'entry', entry, 'attempts', attempts,
      'updated_ms', now_s, 'fence', token, 'send_by', send_by_s,
      'trail', ledger_trail(trail, now_s .. ' submit attempt=' .. attempts .. ' by=' .. me .. ' fence=' .. token
        .. ' entry=' .. entry))
    redis.call('HDEL', key, 'checker', 'check_until', 'absent_checks', 'absent_first')
    redis.call('EXPIRE', key, ttl_s)
    ledger_move(key, current[6], 'QUEUED', 'SUBMITTING', false, ttl)
    out[i - 1] = {'QUEUED', attempts, 0}
    fenced = true
  elseif state == 'SUBMITTING' or state == 'AMBIGUOUS' then
    -- A record from before fencing has no send_by: its owner had at most a window from updated_ms.
    local send_by = tonumber(current[3] or '') or (tonumber(current[4] or '0') + window)
    local holder = redis.call('HMGET', key, 'checker', 'check_until')
    if state == 'SUBMITTING' and send_by + margin > now then
      out[i - 1] = {'WAIT', attempts, send_by + margin - now}
    elseif holder[1] and holder[1] ~= me and tonumber(holder[2]) > now then
      out[i - 1] = {'BUSY', attempts, 0}
    else
      redis.call('HSET', key, 'checker', me, 'check_until', now + lease,
        'trail', ledger_trail(trail, now_s .. ' reconcile state=' .. state .. ' by=' .. me))
      out[i - 1] = {state, attempts, 0}
    end
  else
    out[i - 1] = {'SETTLED', attempts, 0}
  end
end
if fenced then redis.call('SET', KEYS[1], me, 'PX', window) end
ledger_flush()
return {g and guards_count(g) or {}, out}
