-- report_append.lua: append one raw page of GET /sms/3/reports to the raw stream before anything
-- parses it, and tell the caller whether its drain lease is still current (fencing).
-- KEYS[1]  the raw reports stream
-- KEYS[2]  the drain lease's fencing counter (see lease.lua)
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  the raw page (the 200 body, as received)
-- ARGV[3]  its source: `drain`, or `drain:{account}` for an account of SMS_ACCOUNTS (absent: `drain`)
-- Returns {1, entry id} when the token is current; {0, entry id} when it is stale.
-- The page is appended either way. The provider handed it out once and for all, and processing is
-- idempotent (a report applied twice gives one event), so a page fetched by a drainer that paused
-- past its lease is as good as any other; kept aside instead (it used to be dead-lettered as
-- drain_fenced) nothing would ever apply it. The stale token only tells that drainer to stop
-- fetching: the lease, and the pages after this one, belong to its successor.
local current = redis.call('GET', KEYS[2])
local id = redis.call('XADD', KEYS[1], '*', 'page', ARGV[2], 'src', ARGV[3] or 'drain', 'fence', ARGV[1])
if current and current == ARGV[1] then
  return {1, id}
end
return {0, id}
