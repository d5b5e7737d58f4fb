-- report_apply.lua: apply delivery-report outcomes to message states, publish their events, park
-- reports of messages not known yet, and acknowledge the raw pages they came from, atomically.
-- KEYS[1]  the raw reports stream            KEYS[2]  the status events stream
-- KEYS[3]  the awaiting-report sorted set     KEYS[4]  the dead-letter stream
-- KEYS[5]  parked reports, hash (messageId -> report JSON)
-- KEYS[6]  parked reports, sorted set (messageId -> first seen, ms)
-- KEYS[7]  report counters, hash
-- KEYS[7+i] the message hash of op i
-- ARGV[1]  consumer group of KEYS[1]   ARGV[2]  now in ms   ARGV[3]  events stream max length (~)
-- ARGV[4]  A, how many raw entry ids follow; ARGV[5..4+A] the ids to XACK and XDEL
-- ARGV[5+A] D, how many dead letters follow, then D pairs (messageId, dead-letter JSON)
-- then 7 values per op i: code, messageId (of the hash KEYS[7+i]), new state, status name, payload,
--   price ("<millionths> <currency>" or ""), source (drain, webhook, logs... "" for ops without a report)
-- Op codes (worker.reports.ops.OpCode; tests/unit/test_report_ops.py checks both tables):
--   A  APPLY           a final report from a raw page; payload: its event JSON
--   P  PARK            the report of a message with no hash: park it; payload: the report JSON
--   R  RETRY_PARKED    a parked report retried: as A, and unparked once applied or found a duplicate
--   U  UNPARK_UNKNOWN  a parked report timed out: unpark, count; payload: the unknown_message event
--                      ("" = drop)
--   N  NO_REPORT       no report before the deadline: ACCEPTED -> EXPIRED, reason no_report;
--                      payload: its event
-- Transitions: a final report moves QUEUED, SUBMITTING, AMBIGUOUS, ACCEPTED, and EXPIRED with
-- reason no_report, to its final state; any other final state stays (a duplicate: no event).
-- The caller read the hashes first (report_fetch.lua) and built the events; an op whose message
-- appeared, vanished, or became open without an event since then is a conflict: it changes
-- nothing, and if any op conflicts nothing is acknowledged or dead-lettered, so the caller
-- retries the conflicting ops with fresh reads (a crash in between replays the page; every op
-- is idempotent).
-- Every state change is written to the message's trail (with its report's source and its event's
-- id) and moves its campaign's counters, adding the report's price to the campaign's sum.
-- Returns {acked (1|0), result per op}; the results (worker.reports.ops.ApplyResult):
--   0  NOTHING    nothing to do (a duplicate)
--   1  APPLIED
--   2  CONFLICT   the message changed since it was read: nothing done
--   3  PARKED
--   4  TIMED_OUT  a parked report given up (unknown_message emitted or dropped)
--#include ledger
local raw, events, awaiting, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local parked, parked_since, counters = KEYS[5], KEYS[6], KEYS[7]
local group, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local n_ack = tonumber(ARGV[4])
local acks = {}
for i = 1, n_ack do acks[i] = ARGV[4 + i] end
local dbase = 5 + n_ack
local n_dead = tonumber(ARGV[dbase])
local obase = dbase + 2 * n_dead

local OPEN = {QUEUED = true, SUBMITTING = true, AMBIGUOUS = true, ACCEPTED = true}
local out, done, unparked = {0}, {}, {}
local count = {applied = 0, duplicates = 0, parked = 0, unknown_emitted = 0, unknown_dropped = 0,
  no_report = 0, conflicts = 0, dead_letters = 0}
local conflict, emitted = false, 0
local server_ms = ledger_ms_text(ledger_now())  -- the trail's clock, as in the other scripts

-- Scripts are not rolled back on error: refuse a bad call before writing anything.
local CODES = {A = true, P = true, R = true, U = true, N = true}
if #ARGV ~= obase + 7 * (#KEYS - 7) then
  return redis.error_reply('report_apply: ' .. #ARGV .. ' arguments do not match ' .. (#KEYS - 7) .. ' ops')
end
for i = 8, #KEYS do
  local code = ARGV[obase + (i - 8) * 7 + 1]
  if not CODES[code] then return redis.error_reply('report_apply: unknown op code ' .. tostring(code)) end
end

for i = 8, #KEYS do
  local key = KEYS[i]
  local b = obase + (i - 8) * 7
  local code, mid = ARGV[b + 1], ARGV[b + 2]
  local state, status, payload, price, source = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  local cur = redis.call('HMGET', key, 'state', 'reason', 'trail', 'campaign')
  local current, reason, campaign = cur[1], cur[2], cur[4]
  local ttl = campaign and redis.call('TTL', key) or nil
  local result = 0
  if code == 'A' or code == 'R' then
    if not current then
      result = 2
    elseif OPEN[current] or (current == 'EXPIRED' and reason == 'no_report') then
      if payload == '' then
        result = 2
      else
        local event_id = redis.call('XADD', events, '*', 'event', payload)
        redis.call('HSET', key, 'state', state, 'status', status, 'updated_ms', now,
          'trail', ledger_trail(cur[3], server_ms .. ' report to=' .. state .. ' status=' .. status
            .. ' source=' .. source .. ' event=' .. event_id))
        if reason then redis.call('HDEL', key, 'reason') end
        ledger_move(key, campaign, current, state, false, ttl)
        -- A report for a message not known accepted yet (its send's answer was lost, is not in yet, or
        -- it waits to be resent): the provider did accept it, so it counts as sent now. settle.lua
        -- counts it when it moves it to ACCEPTED, which it no longer does from a final state.
        if current ~= 'ACCEPTED' and current ~= 'EXPIRED' then ledger_count(key, campaign, 'sent', 1, ttl) end
        if campaign and price ~= '' then  -- a price is summed per campaign only
          local micro, currency = string.match(price, '^(-?%d+) (%S+)$')
          if micro then ledger_count(key, campaign, 'price:' .. currency, tonumber(micro), ttl) end
        end
        emitted = emitted + 1
        done[#done + 1] = mid
        result = 1
      end
    end
    if code == 'R' and result ~= 2 then unparked[#unparked + 1] = mid end
  elseif code == 'P' then
    if current then
      result = 2
    else
      redis.call('HSETNX', parked, mid, payload)
      redis.call('ZADD', parked_since, 'NX', now, mid)
      result = 3
    end
  elseif code == 'U' then
    if current then
      result = 2
    else
      if payload ~= '' then
        redis.call('XADD', events, '*', 'event', payload)
        emitted = emitted + 1
        count.unknown_emitted = count.unknown_emitted + 1
      else
        count.unknown_dropped = count.unknown_dropped + 1
      end
      unparked[#unparked + 1] = mid
      result = 4
    end
  elseif code == 'N' then
    if current == 'ACCEPTED' then
      if payload == '' then
        result = 2
      else
        local event_id = redis.call('XADD', events, '*', 'event', payload)
        redis.call('HSET', key, 'state', 'EXPIRED', 'reason', 'no_report', 'updated_ms', now,
          'trail', ledger_trail(cur[3], server_ms .. ' expired reason=no_report event=' .. event_id))
        ledger_move(key, campaign, current, 'EXPIRED', false, ttl)
        emitted = emitted + 1
        count.no_report = count.no_report + 1
        result = 1
      end
    end
    if result ~= 2 then done[#done + 1] = mid end
  end
  if result == 2 then conflict = true; count.conflicts = count.conflicts + 1 end
  if result == 1 and code ~= 'N' then count.applied = count.applied + 1 end
  if result == 0 and (code == 'A' or code == 'R') then count.duplicates = count.duplicates + 1 end
  if result == 3 then count.parked = count.parked + 1 end
  out[#out + 1] = result
end

-- Variadic commands in chunks keep unpack() under Lua's stack limit.
local function chunked(list, fn)
  for i = 1, #list, 1000 do fn({unpack(list, i, math.min(i + 999, #list))}) end
end
chunked(done, function(c) redis.call('ZREM', awaiting, unpack(c)) end)
chunked(unparked, function(c)
  redis.call('HDEL', parked, unpack(c))
  redis.call('ZREM', parked_since, unpack(c))
end)
if emitted > 0 then redis.call('XTRIM', events, 'MAXLEN', '~', maxlen) end

if not conflict then
  for j = 1, n_dead do
    redis.call('XADD', dlq, '*', 'message_id', ARGV[dbase + 2 * j - 1], 'entry', ARGV[dbase + 2 * j])
  end
  count.dead_letters = n_dead
  chunked(acks, function(c)
    redis.call('XACK', raw, group, unpack(c))
    redis.call('XDEL', raw, unpack(c))
  end)
  out[1] = 1
end
for name, n in pairs(count) do
  if n > 0 then redis.call('HINCRBY', counters, name, n) end
end
ledger_flush()
return out
