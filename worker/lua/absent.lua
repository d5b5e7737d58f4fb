-- absent.lua: the verdict on messages a reconciler did not find in the provider's logs.
-- Absence shortly after a send is weak evidence (the logs may lag, a provider may act on a request
-- after our read timeout), so a message is resent only once it was absent in at least N checks
-- spread over a window; and only by the reconciler that still holds its lease, so one that
-- outlived its lease (paused, or starved of logs calls) never resends.
-- KEYS[1]  the resend's fence key (set here, PX = send window, when a message is resent)
-- KEYS[1+i] the message hash of the i-th message
-- ARGV[1]  this consumer's name (the checker)
-- ARGV[2]  checks needed
-- ARGV[3]  window in ms the checks must span
-- ARGV[4]  the resend's fence token
-- ARGV[5]  send window in ms
-- ARGV[6]  most attempts a message may have
-- Returns, per message, {verdict, attempts, wait ms}:
--   RESEND    -> SUBMITTING again under the new fence (send_by = now + send window), one more
--                attempt counted; the caller sends it with the same messageId.
--   WAIT      -> AMBIGUOUS, absence recorded; check again in wait ms. The lease is released.
--   EXHAUSTED -> a resend would pass the attempts limit; nothing changed (the caller dead-letters).
--   STALE     -> this consumer no longer holds the message's reconciliation lease, or its state
--                moved on: nothing changed, the caller leaves it alone.
-- (worker.store.AbsentVerdict names these verdicts; worker.transitions lists the state changes.)
-- WAIT and RESEND are written to the message's trail (both states count as "sending" in campaigns).
--#include ledger
local me, needed, window, token = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local send_window, max_attempts = tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, fenced = {}, false
for i = 2, #KEYS do
  local key = KEYS[i]
  local h = redis.call('HMGET', key, 'state', 'attempts', 'checker', 'check_until', 'absent_checks', 'absent_first',
    'trail')
  local state, attempts = h[1], tonumber(h[2] or '0')
  if (state ~= 'SUBMITTING' and state ~= 'AMBIGUOUS') or h[3] ~= me or tonumber(h[4] or '0') <= now then
    out[i - 1] = {'STALE', attempts, 0}
  else
    local checks = tonumber(h[5] or '0') + 1
    local first = tonumber(h[6] or '') or now
    if checks >= needed and now - first >= window then
      if attempts + 1 > max_attempts then
        out[i - 1] = {'EXHAUSTED', attempts + 1, 0}
      else
        redis.call('HSET', key, 'state', 'SUBMITTING', 'attempts', attempts + 1, 'updated_ms', now,
          'fence', token, 'send_by', now + send_window,
          'trail', ledger_trail(h[7], now .. ' resend attempt=' .. (attempts + 1) .. ' by=' .. me .. ' fence=' .. token))
        redis.call('HDEL', key, 'checker', 'check_until', 'absent_checks', 'absent_first')
        out[i - 1] = {'RESEND', attempts + 1, 0}
        fenced = true
      end
    else
      redis.call('HSET', key, 'state', 'AMBIGUOUS', 'updated_ms', now, 'absent_checks', checks,
        'absent_first', first, 'trail', ledger_trail(h[7], now .. ' absent check=' .. checks .. ' by=' .. me))
      redis.call('HDEL', key, 'checker', 'check_until')
      -- The next check is due at the next of the N points spread evenly over the window.
      local spacing = needed > 1 and math.floor(window / (needed - 1)) or window
      local due = first + spacing * checks
      if checks >= needed then due = first + window end
      out[i - 1] = {'WAIT', attempts, math.max(100, due - now)}
    end
  end
end
if fenced then redis.call('SET', KEYS[1], me, 'PX', send_window) end
return out
