-- policy.lua: a lane's counted guards for one batch, decided and counted in one atomic step before
-- its POST (worker.policy says what the answers mean): the daily spend caps, velocity per number and
-- per number prefix, the per-campaign daily cap, and the daily cap of the lane's account (counted over
-- all the account's lanes in the same call). Redis runs one call at a time, so however many processes
-- and hosts dispatch, the counts are exact and a cap is overshot by at most one batch.
-- KEYS[i]  the message hash of the i-th message (read only: is it fresh?)
-- ARGV[1]  the lane's counter prefix ("{p}:policy:{lane}:"; the names below are derived from it)
-- ARGV[2]  the lane's pause key
-- ARGV[3]  per-number limit (0: off)   ARGV[4]  its window in ms
-- ARGV[5]  per-prefix limit (0: off)   ARGV[6]  its window in ms
-- ARGV[7]  daily messages cap (0: off) ARGV[8]  daily parts cap (0: off)
-- ARGV[9]  per-campaign daily messages cap (0: off)
-- ARGV[10] the account's counter prefix ("{p}:policy:acct:{account}:"), "" when its account has no cap
-- ARGV[11] the account's daily messages cap (0: off)  ARGV[12] its daily parts cap (0: off)
-- Then per message, from ARGV[13]: number, prefix ("" when the prefix rule is off), parts, campaign ("" none).
-- Time is the server's (TIME): a UTC day is day = floor(ms / 86400000) on Redis's clock, windows are
-- fixed (window index = floor(ms / window)), so a number may get up to twice its limit across the
-- boundary of two windows (documented in worker/policy.py).
-- Only fresh messages are checked and counted: no record yet, or QUEUED and never attempted (a due
-- scheduled job), and not counted by an earlier call. A message attempted before was counted when it
-- was first allowed, so a retry after an outage is neither counted twice nor refused (answer SEEN);
-- and so is one whose worker died between this call and its submit (taken over after the lease, it
-- still has no record): every message this call allows is remembered in its two-hour slot's
-- `m:<slot>` hash (message hash key -> 1, kept six hours; this slot's and the last are read).
-- The counts of one window (or day) are one hash, number -> count (`{p}:policy:{lane}:n:<window>`,
-- `p:<window>` for prefixes, `c:<day>` for campaigns), expiring a second after its window ends: a
-- batch reads each hash with one HMGET and writes it with one HSET, where a key per number cost
-- two commands per message (about three times the Redis CPU).
-- Every read comes before any write: a key of the wrong type fails the call before it counted
-- anything (the dispatcher then applies the lane's on_guard_error).
-- Returns {budget, day, messages today, parts today, pause ms, answers, newly paused (1/0),
--          account messages today, account parts today, which caps (1: the lane's, 2: the account's, 3: both)}:
--   budget 1: the lane (or its account) was at or over a cap already: nothing was counted, the lane
--             is now paused with reason `budget` until the next UTC midnight, answers is empty (hold
--             the batch);
--   budget 2: this batch was counted and brought the lane (or its account) to a cap: paused likewise
--             after it;
--   budget 0: under every cap.
--   Only the calling lane is paused: the account's other lanes pause when their own next batch
--   finds the account at its cap here (worker/policy.py says why).
--   answers: one letter per message, in one string (a thousand replies of their own cost Redis and
--   the caller more than the decisions): O (allowed and counted), S (seen: not fresh, allowed, not
--   counted), N / P (over the per-number / per-prefix velocity rule: not counted), C (its campaign
--   is at its cap today: not counted, hold it).
local prefix, pause = ARGV[1], ARGV[2]
local nlimit, nwin = tonumber(ARGV[3]), tonumber(ARGV[4])
local plimit, pwin = tonumber(ARGV[5]), tonumber(ARGV[6])
local mcap, pcap, ccap = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local aprefix, amcap, apcap = ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12])
local first = 13  -- the first message's arguments
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local midnight = (day + 1) * 86400000
local daykey = prefix .. 'day:' .. day
local d = redis.call('HMGET', daykey, 'messages', 'parts', 'extra')
local used_m, used_p, extra = tonumber(d[1] or '0'), tonumber(d[2] or '0'), tonumber(d[3] or '0')
local acctkey = aprefix ~= '' and (aprefix .. 'day:' .. day) or nil
local acct_m, acct_p, acct_extra = 0, 0, 0
if acctkey then
  local a = redis.call('HMGET', acctkey, 'messages', 'parts', 'extra')
  acct_m, acct_p, acct_extra = tonumber(a[1] or '0'), tonumber(a[2] or '0'), tonumber(a[3] or '0')
end

-- Which caps are reached: 1 the lane's, 2 the account's, 3 both, 0 none.
local function over()
  local lane = (mcap > 0 and used_m >= mcap + extra) or (pcap > 0 and used_p >= pcap + extra)
  local acct = acctkey ~= nil and ((amcap > 0 and acct_m >= amcap + acct_extra)
                                   or (apcap > 0 and acct_p >= apcap + acct_extra))
  return (lane and 1 or 0) + (acct and 2 or 0)
end

-- Pause the lane until midnight; 1 if this call paused it (the one loud log line), 0 if it was already.
local function pause_lane()
  return redis.call('SET', pause, 'budget', 'PX', midnight - now, 'GET') == 'budget' and 0 or 1
end

local reached = over()
if reached > 0 then
  return {1, day, used_m, used_p, midnight - now, '', pause_lane(), acct_m, acct_p, reached}
end

-- One counter hash per rule: its key, its expiry, and (per field) the count read and the count now
-- (`now[field]` is also the set of the fields the batch needs, `order` their order).
local function counter(on, key, ends)
  if not on then return nil end
  return {key = key, ends = ends + 1000, order = {}, base = {}, now = {}}
end
local nw, pw = 0, 0
if nlimit > 0 then nw = math.floor(now / nwin) end
if plimit > 0 then pw = math.floor(now / pwin) end
local rules = {
  counter(nlimit > 0, prefix .. 'n:' .. nw, (nw + 1) * nwin),
  counter(plimit > 0, prefix .. 'p:' .. pw, (pw + 1) * pwin),
  counter(ccap > 0, prefix .. 'c:' .. day, midnight + 3600000),
}
-- A count as the text Redis stores: Redis formats a Lua number it is given with snprintf, which per
-- field written was a tenth of this script's time; the small counts a window holds are made once.
local TEXT = {}
for k = 1, 64 do TEXT[k] = string.format('%d', k) end
local function text(n) return TEXT[n] or string.format('%d', n) end

-- Which messages were counted by an earlier call (allowed, then their worker died before submit):
-- filed per two-hour slot and read for this slot and the last, so a mark is seen for at least two
-- hours: longer than a lease (SMS_LEASE_S is at most an hour) and the recovery that takes the message
-- over after it. A takeover later than that (every worker down for hours) counts it once more, which
-- at worst holds back one message early (never lets one more through). Memory: hours of traffic,
-- where a day's file kept two days of it.
local slot = math.floor(now / 7200000)  -- two hours
local seen_today, seen_before = prefix .. 'm:' .. slot, prefix .. 'm:' .. (slot - 1)
-- Each rule's counts (nil: the rule is off): the code below names them one by one, where a loop
-- over the three rules per message cost more Lua than the decisions themselves.
local nrule, prule, crule = rules[1], rules[2], rules[3]
local nnow, pnow, cnow = nrule and nrule.now, prule and prule.now, crule and crule.now
local norder, porder, corder = nrule and nrule.order, prule and prule.order, crule and crule.order

-- Which messages are fresh (not marked, then: no record, or QUEUED and never attempted), and the
-- fields each rule needs for them, a chunk of the marks read at a time (unpack() has a stack limit).
-- No table per message: at a thousand messages per call the allocations were a good part of the
-- script's time.
local fresh = {}
for c = 1, #KEYS, 1000 do
  local last = math.min(c + 999, #KEYS)
  local today = redis.call('HMGET', seen_today, unpack(KEYS, c, last))
  local before = redis.call('HMGET', seen_before, unpack(KEYS, c, last))
  local at = first + 4 * (c - 1)
  for i = c, last do
    local ok = false
    if not (today[i - c + 1] or before[i - c + 1]) then
      -- HGET, not HMGET: a table per message is what the reply into Lua costs most.
      local state = redis.call('HGET', KEYS[i], 'state')
      if not state then
        ok = true
      elseif state == 'QUEUED' then
        local attempts = redis.call('HGET', KEYS[i], 'attempts')
        ok = not attempts or attempts == '0'
      end
    end
    fresh[i] = ok
    if ok then
      local f = ARGV[at]
      if nnow and f ~= '' and not nnow[f] then nnow[f] = 0; norder[#norder + 1] = f end
      f = ARGV[at + 1]
      if pnow and f ~= '' and not pnow[f] then pnow[f] = 0; porder[#porder + 1] = f end
      f = ARGV[at + 3]
      if cnow and f ~= '' and not cnow[f] then cnow[f] = 0; corder[#corder + 1] = f end
    end
    at = at + 4
  end
end

-- The reads: one HMGET per rule (in chunks: unpack() has a stack limit).
for r = 1, 3 do
  local rule = rules[r]
  if rule then
    local order, base, counts = rule.order, rule.base, rule.now
    for c = 1, #order, 1000 do
      local last = math.min(c + 999, #order)
      local got = redis.call('HMGET', rule.key, unpack(order, c, last))
      for j = c, last do
        local v = got[j - c + 1]
        local n = v and tonumber(v) or 0  -- most fields are new in their window: no conversion
        base[order[j]], counts[order[j]] = n, n
      end
    end
  end
end

-- The decisions, in the batch's order, the rules in the order number, prefix, campaign (the first
-- over its limit answers): a refused message moves no count. The allowed ones are marked below.
local out, allowed, added_m, added_p = {}, {}, 0, 0
local at = first
for i = 1, #KEYS do
  local answer = 'S'
  if fresh[i] then
    local fn, fp, fc = ARGV[at], ARGV[at + 1], ARGV[at + 3]
    if nnow and fn ~= '' and nnow[fn] >= nlimit then
      answer = 'N'
    elseif pnow and fp ~= '' and pnow[fp] >= plimit then
      answer = 'P'
    elseif cnow and fc ~= '' and cnow[fc] >= ccap then
      answer = 'C'
    else
      answer = 'O'
      if nnow and fn ~= '' then nnow[fn] = nnow[fn] + 1 end
      if pnow and fp ~= '' then pnow[fp] = pnow[fp] + 1 end
      if cnow and fc ~= '' then cnow[fc] = cnow[fc] + 1 end
      local parts = ARGV[at + 2]
      added_m, added_p = added_m + 1, added_p + (parts == '1' and 1 or tonumber(parts))
      allowed[#allowed + 1] = KEYS[i]
      allowed[#allowed + 1] = '1'
    end
  end
  out[i] = answer
  at = at + 4
end

-- The writes, after every read: one HSET per rule with the fields this batch moved.
for r = 1, 3 do
  local rule = rules[r]
  if rule then
    local moved = {}
    for _, field in ipairs(rule.order) do
      local count = rule.now[field]
      if count > rule.base[field] then
        moved[#moved + 1] = field
        moved[#moved + 1] = text(count)
      end
    end
    for c = 1, #moved, 1000 do
      redis.call('HSET', rule.key, unpack(moved, c, math.min(c + 999, #moved)))
    end
    if #moved > 0 then redis.call('PEXPIREAT', rule.key, rule.ends) end
  end
end
for c = 1, #allowed, 1000 do
  redis.call('HSET', seen_today, unpack(allowed, c, math.min(c + 999, #allowed)))
end
if #allowed > 0 then redis.call('PEXPIREAT', seen_today, (slot + 3) * 7200000) end
if added_m > 0 then
  redis.call('HINCRBY', daykey, 'messages', added_m)
  redis.call('HINCRBY', daykey, 'parts', added_p)
  redis.call('EXPIRE', daykey, 2 * 86400)
  used_m, used_p = used_m + added_m, used_p + added_p
  if acctkey then
    redis.call('HINCRBY', acctkey, 'messages', added_m)
    redis.call('HINCRBY', acctkey, 'parts', added_p)
    redis.call('EXPIRE', acctkey, 2 * 86400)
    acct_m, acct_p = acct_m + added_m, acct_p + added_p
  end
end
reached = over()
if reached > 0 then
  return {2, day, used_m, used_p, midnight - now, table.concat(out), pause_lane(), acct_m, acct_p, reached}
end
return {0, day, used_m, used_p, 0, table.concat(out), 0, acct_m, acct_p, 0}
