-- guards.lua: a lane's counted traffic-policy guards (worker.policy says what they mean), included by
-- submit.lua (`--#include guards`) and decided there for the messages it is about to record as
-- SUBMITTING: the daily spend caps of the lane and of its account, velocity per number and per
-- number prefix, and the per-campaign daily cap. A message is counted in the same atomic call that
-- moves it to SUBMITTING, so it is counted exactly once however workers die around it: one that is
-- taken over later is found SUBMITTING (reconciled, not counted), one retried after an outage is found
-- QUEUED and attempted (sent, not counted). Redis runs one call at a time, so across all processes and
-- hosts the counts are exact and a cap is overshot by at most one call's messages (SCRIPT_CHUNK).
-- Arguments, when submit.lua's ARGV[7] says 13 of them follow it:
-- ARGV[8]  the lane's counter prefix ("{p}:policy:{lane}:"; the names below are derived from it)
-- ARGV[9]  the lane's pause key
-- ARGV[10] per-number limit (0: off)   ARGV[11] its window in ms
-- ARGV[12] per-prefix limit (0: off)   ARGV[13] its window in ms
-- ARGV[14] daily messages cap (0: off) ARGV[15] daily parts cap (0: off)
-- ARGV[16] per-campaign daily messages cap (0: off)
-- ARGV[17] the account's counter prefix ("{p}:policy:acct:{account}:"), "" when its account has no cap
-- ARGV[18] the account's daily messages cap (0: off)  ARGV[19] its daily parts cap (0: off)
-- ARGV[20] on_guard_error: "open" or "closed"
-- and per message, after its four submit fields: number, prefix ("" when the prefix rule is off),
-- parts, campaign reference ("" none).
-- Time is the server's: a UTC day is floor(ms / 86400000) on Redis's clock, windows are fixed
-- (window index = floor(ms / window)), so a number may get up to twice its limit across the boundary
-- of two windows. The counts of one window (or day) are one hash, number -> count
-- (`{p}:policy:{lane}:n:<window>`, `p:<window>` for prefixes, `c:<day>` for campaigns), expiring a
-- second after its window ends: a call reads each hash with one HMGET and writes it with one HSET.
-- Every read of the guards' state comes before any write of the call, through redis.pcall: a key of
-- the wrong type is reported (the head's error), never half counted. The lane's on_guard_error then
-- decides: open submits the messages uncounted, closed submits nothing (answer GUARD_ERROR).

-- Which caps are reached: 1 the lane's, 2 the account's, 3 both, 0 none.
local function guard_over(g)
  local lane = (g.mcap > 0 and g.used_m >= g.mcap + g.extra) or (g.pcap > 0 and g.used_p >= g.pcap + g.extra)
  local acct = g.acctkey ~= nil and ((g.amcap > 0 and g.acct_m >= g.amcap + g.acct_extra)
                                     or (g.apcap > 0 and g.acct_p >= g.apcap + g.acct_extra))
  return (lane and 1 or 0) + (acct and 2 or 0)
end

-- Pause the lane with reason budget until midnight; 1 if this call paused it (its one loud log
-- line), 0 if it was paused so already.
local function guard_pause(g)
  return redis.call('SET', g.pause, 'budget', 'PX', g.midnight - g.now, 'GET') == 'budget' and 0 or 1
end

-- The head of submit.lua's reply: {budget, day, messages today, parts today, pause ms, newly paused
-- (1/0), account messages today, account parts today, which caps (as guard_over), error ("": none),
-- the call's messages}.
--   budget 1: the lane (or its account) was at a cap already: nothing was submitted or counted
--             (every answer BUDGET), the lane is paused until the next UTC midnight;
--   budget 2: the messages counted in this call brought it to a cap: paused likewise after them;
--   budget 0: under every cap.
-- Only the calling lane is paused: the account's other lanes pause when their own next call finds
-- the account at its cap (worker/policy.py says why).
local function guard_head(g, budget, newly, reached)
  local pause_ms = budget > 0 and g.midnight - g.now or 0
  return {budget, g.day, g.used_m, g.used_p, pause_ms, newly, g.acct_m, g.acct_p, reached, g.error or '', #KEYS - 1}
end

-- HMGET through pcall: nil (and g.error set) when Redis refuses it.
local function guard_read(g, key, fields)
  local got = redis.pcall('HMGET', key, unpack(fields))
  if got.err then
    g.error = got.err
    return nil
  end
  return got
end

-- One counter hash per rule that is on: its key, its expiry, and per field (in `order`) the count
-- read (`base`) and the count now (`now`, also the set of the fields the call needs).
local function guard_rule(key, ends)
  return {key = key, ends = ends + 1000, order = {}, base = {}, now = {}}
end

-- A count as the text Redis stores: Redis formats a Lua number it is given with snprintf, which per
-- field written was a tenth of the guards' time; the small counts a window holds are made once.
local GUARD_TEXT = {}
for k = 1, 64 do GUARD_TEXT[k] = string.format('%d', k) end

-- The decision for the messages of this call (`current[i]`: the HMGET of state and attempts of
-- KEYS[i]; `at(i)`: the ARGV index before message i's first guard field). Returns the guards' state
-- g: g.error (unreadable; nothing decided), g.reached (a cap reached already: every message waits),
-- else g.refused[i] = NUMBER / PREFIX / CAMPAIGN for the fresh messages a rule refuses; the others
-- are counted by guards_count once submit.lua has recorded them.
local function guards_decide(current, now, at)
  local prefix = ARGV[8]
  local nlimit, nwin = tonumber(ARGV[10]), tonumber(ARGV[11])
  local plimit, pwin = tonumber(ARGV[12]), tonumber(ARGV[13])
  local ccap = tonumber(ARGV[16])
  local day = math.floor(now / 86400000)
  local g = {now = now, day = day, midnight = (day + 1) * 86400000, pause = ARGV[9], refused = {},
             mcap = tonumber(ARGV[14]), pcap = tonumber(ARGV[15]), amcap = tonumber(ARGV[18]),
             apcap = tonumber(ARGV[19]), used_m = 0, used_p = 0, extra = 0, acct_m = 0, acct_p = 0,
             acct_extra = 0, added_m = 0, added_p = 0, daykey = prefix .. 'day:' .. day}
  local d = guard_read(g, g.daykey, {'messages', 'parts', 'extra'})
  if not d then return g end
  g.used_m, g.used_p, g.extra = tonumber(d[1] or '0'), tonumber(d[2] or '0'), tonumber(d[3] or '0')
  if ARGV[17] ~= '' then
    g.acctkey = ARGV[17] .. 'day:' .. day
    local a = guard_read(g, g.acctkey, {'messages', 'parts', 'extra'})
    if not a then return g end
    g.acct_m, g.acct_p, g.acct_extra = tonumber(a[1] or '0'), tonumber(a[2] or '0'), tonumber(a[3] or '0')
  end
  local reached = guard_over(g)
  if reached > 0 then
    g.reached = reached
    return g
  end

  local nrule, prule, crule
  if nlimit > 0 then
    local w = math.floor(now / nwin)
    nrule = guard_rule(prefix .. 'n:' .. w, (w + 1) * nwin)
  end
  if plimit > 0 then
    local w = math.floor(now / pwin)
    prule = guard_rule(prefix .. 'p:' .. w, (w + 1) * pwin)
  end
  if ccap > 0 then crule = guard_rule(prefix .. 'c:' .. day, g.midnight + 3600000) end
  g.rules = {nrule, prule, crule}
  -- Each rule's counts named one by one (nil: the rule is off): a loop over the three rules per
  -- message cost more Lua than the decisions themselves.
  local nnow, pnow, cnow = nrule and nrule.now, prule and prule.now, crule and crule.now
  local norder, porder, corder = nrule and nrule.order, prule and prule.order, crule and crule.order

  -- Which messages are fresh (no record, or QUEUED and never attempted: a due scheduled job), and
  -- the fields each rule needs for them. Only they are counted: any other was counted when it was
  -- first submitted. No table per message: allocations were a good part of the guards' time.
  local fresh = {}
  for i = 2, #KEYS do
    local state, attempts = current[i][1], current[i][2]
    local ok = not state or (state == 'QUEUED' and (not attempts or attempts == '0'))
    fresh[i] = ok
    if ok then
      local base = at(i)
      local f = ARGV[base + 1]
      if nnow and f ~= '' and not nnow[f] then nnow[f] = 0; norder[#norder + 1] = f end
      f = ARGV[base + 2]
      if pnow and f ~= '' and not pnow[f] then pnow[f] = 0; porder[#porder + 1] = f end
      f = ARGV[base + 4]
      if cnow and f ~= '' and not cnow[f] then cnow[f] = 0; corder[#corder + 1] = f end
    end
  end

  -- The reads: one HMGET per rule (a call holds SCRIPT_CHUNK messages: unpack() has room for them).
  for r = 1, 3 do
    local rule = g.rules[r]
    if rule and #rule.order > 0 then
      local got = guard_read(g, rule.key, rule.order)
      if not got then return g end
      for j, field in ipairs(rule.order) do
        local v = got[j]
        local n = v and tonumber(v) or 0  -- most fields are new in their window: no conversion
        rule.base[field], rule.now[field] = n, n
      end
    end
  end

  -- The decisions, in the call's order, the rules in the order number, prefix, campaign (the first
  -- over its limit answers): a refused message moves no count.
  for i = 2, #KEYS do
    if fresh[i] then
      local base = at(i)
      local fn, fp, fc = ARGV[base + 1], ARGV[base + 2], ARGV[base + 4]
      if nnow and fn ~= '' and nnow[fn] >= nlimit then
        g.refused[i] = 'NUMBER'
      elseif pnow and fp ~= '' and pnow[fp] >= plimit then
        g.refused[i] = 'PREFIX'
      elseif cnow and fc ~= '' and cnow[fc] >= ccap then
        g.refused[i] = 'CAMPAIGN'
      else
        if nnow and fn ~= '' then nnow[fn] = nnow[fn] + 1 end
        if pnow and fp ~= '' then pnow[fp] = pnow[fp] + 1 end
        if cnow and fc ~= '' then cnow[fc] = cnow[fc] + 1 end
        local parts = ARGV[base + 3]
        g.added_m, g.added_p = g.added_m + 1, g.added_p + (parts == '1' and 1 or tonumber(parts))
      end
    end
  end
  return g
end

-- The head for a call that submitted nothing because of the guards (a cap reached already, or
-- unreadable guards on a lane that fails closed); the budget pause is its only write.
local function guards_refused(g)
  if g.reached then return guard_head(g, 1, guard_pause(g), g.reached) end
  return guard_head(g, 0, 0, 0)
end

-- After submit.lua recorded the allowed messages: write the counts they moved (one HSET per rule,
-- the day's spend of the lane and of its account), pause the lane if a cap is reached now; the head.
local function guards_count(g)
  if g.error then return guard_head(g, 0, 0, 0) end  -- open: submitted uncounted
  for r = 1, 3 do
    local rule = g.rules[r]
    if rule then
      local moved = {}
      for _, field in ipairs(rule.order) do
        local count = rule.now[field]
        if count > rule.base[field] then
          moved[#moved + 1] = field
          moved[#moved + 1] = GUARD_TEXT[count] or string.format('%d', count)
        end
      end
      if #moved > 0 then
        redis.call('HSET', rule.key, unpack(moved))
        redis.call('PEXPIREAT', rule.key, rule.ends)
      end
    end
  end
  if g.added_m > 0 then
    redis.call('HINCRBY', g.daykey, 'messages', g.added_m)
    redis.call('HINCRBY', g.daykey, 'parts', g.added_p)
    redis.call('EXPIRE', g.daykey, 2 * 86400)
    g.used_m, g.used_p = g.used_m + g.added_m, g.used_p + g.added_p
    if g.acctkey then
      redis.call('HINCRBY', g.acctkey, 'messages', g.added_m)
      redis.call('HINCRBY', g.acctkey, 'parts', g.added_p)
      redis.call('EXPIRE', g.acctkey, 2 * 86400)
      g.acct_m, g.acct_p = g.acct_m + g.added_m, g.acct_p + g.added_p
    end
  end
  local reached = guard_over(g)
  if reached > 0 then return guard_head(g, 2, guard_pause(g), reached) end
  return guard_head(g, 0, 0, 0)
end
