-- ledger.lua: included (worker.store.base.load_script, at the line `--#include ledger`) by every
-- script that changes a message's state, so that each change also, in the same atomic call,
--   1. appends a line to the message's `trail` (what `sms-worker trace` prints), and
--   2. moves the message's campaign counters (`{p}:campaign:<id>`, what `sms-worker campaign` shows),
-- and the two rules live in one place. The trail format and the counters are described in
-- worker/store/keys.py and docs/architecture.md; worker/trace.py and worker/campaigns.py read them.
-- Key names are derived from the message hash key (`{p}:msg:<id>` -> `{p}:campaign:<c>`): the
-- worker does not support Redis Cluster, whose scripts may only touch the keys they are given.

local LEDGER_TRAIL_MAX = 4096
-- The counter a message in each state is counted under (SUBMITTING and AMBIGUOUS are both "sending").
local LEDGER_COUNTER = {
  SCHEDULED = 'scheduled', QUEUED = 'queued', SUBMITTING = 'sending', AMBIGUOUS = 'sending',
  ACCEPTED = 'accepted', REJECTED = 'rejected', DELIVERED = 'delivered', UNDELIVERABLE = 'undeliverable',
  EXPIRED = 'expired', FAILED = 'failed', CANCELLED = 'cancelled',
}
-- Per campaign id: {field -> delta, '#key' = its hash key, '#ttl'}; the ids in order; the key prefix.
local ledger_deltas, ledger_campaigns, ledger_prefix = {}, {}, nil

local function ledger_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Server time in ms as text, for trail lines: made once per call, because turning a number into
-- text (Lua's %.14g) for every message cost more than the rest of writing its trail line.
local function ledger_ms_text(ms)
  return string.format('%d', ms)
end

-- `trail` (the hash's current value, or nil) with `line` appended. Past the cap the first line is
-- kept (where the message started), then a `trimmed` mark and the newest lines, so a message stuck
-- in reconciliation for days keeps a bounded, still useful history.
local function ledger_trail(trail, line)
  if not trail or trail == '' then return line end
  local all = trail .. '\n' .. line
  if #all <= LEDGER_TRAIL_MAX then return all end
  local first = string.match(all, '^[^\n]*')
  local tail = string.sub(all, -math.floor(LEDGER_TRAIL_MAX / 2))
  local cut = string.find(tail, '\n', 1, true)
  if cut then tail = string.sub(tail, cut + 1) end
  return first .. '\n' .. string.match(line, '^%d+') .. ' trimmed\n' .. tail
end

-- Add `n` to a campaign counter (batched: written once per campaign and call by ledger_flush).
local function ledger_count(msgkey, campaign, field, n, ttl)
  if not campaign or campaign == '' or n == 0 then return end
  local d = ledger_deltas[campaign]
  if not d then
    ledger_prefix = ledger_prefix or string.match(msgkey, '^(.-):msg:')
    d = {['#ttl'] = 0, ['#key'] = ledger_prefix .. ':campaign:' .. campaign}
    ledger_deltas[campaign] = d
    ledger_campaigns[#ledger_campaigns + 1] = campaign
  end
  d[field] = (d[field] or 0) + n
  if ttl and ttl > d['#ttl'] then d['#ttl'] = ttl end
end

-- A message of `campaign` moved from state `from` to state `to`. `from` nil: the message is
-- recorded here for the first time; `counted` says whether the producer API counted it at enqueue
-- (as queued: its outbox entry has the field `c`), else it joins the campaign's total now.
-- `to` nil: the message leaves the campaign (a counted entry that repeated a producer id).
local function ledger_move(msgkey, campaign, from, to, counted, ttl)
  if not campaign or campaign == '' then return end
  local a = from and LEDGER_COUNTER[from]
  if not from then
    if counted then a = 'queued' else ledger_count(msgkey, campaign, 'total', 1, ttl) end
  end
  local b = to and LEDGER_COUNTER[to]
  if not to then ledger_count(msgkey, campaign, 'total', -1, ttl) end
  if a == b then return end
  if a then ledger_count(msgkey, campaign, a, -1, ttl) end
  if b then ledger_count(msgkey, campaign, b, 1, ttl) end
end

-- Write the counters moved in this call: per campaign its increments, its update time, its TTL
-- (never shortened: it outlives the longest-lived state of its messages) and its place in the
-- `{p}:campaigns` index.
local function ledger_flush()
  if #ledger_campaigns == 0 then return end
  local now = ledger_now()
  local index = ledger_prefix .. ':campaigns'
  for _, campaign in ipairs(ledger_campaigns) do
    local d = ledger_deltas[campaign]
    local key = d['#key']
    for field, n in pairs(d) do
      if string.sub(field, 1, 1) ~= '#' and n ~= 0 then redis.call('HINCRBY', key, field, n) end
    end
    redis.call('HSETNX', key, 'first_ms', now)
    redis.call('HSET', key, 'updated_ms', now)
    local ttl = d['#ttl']
    if ttl <= 0 then ttl = 86400 end
    if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
    redis.call('ZADD', index, now, campaign)
  end
  ledger_deltas, ledger_campaigns = {}, {}
end

-- A campaign spec from the caller: "" (no campaign), "1<id>" (counted at enqueue), "0<id>" (not).
local function ledger_spec(spec)
  if not spec or spec == '' then return nil, false end
  return string.sub(spec, 2), string.sub(spec, 1, 1) == '1'
end
