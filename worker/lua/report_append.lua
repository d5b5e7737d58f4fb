-- report_append.lua: append one raw page of GET /sms/3/reports to the raw stream, but only while
-- the caller's drain lease is current (fencing), before anything parses it.
-- KEYS[1]  the raw reports stream
-- KEYS[2]  the drain lease's fencing counter (see lease.lua)
-- KEYS[3]  the dead-letter stream
-- ARGV[1]  the caller's fencing token
-- ARGV[2]  the raw page (the 200 body, as received)
-- ARGV[3]  now, ISO 8601 (for the dead letter)
-- Returns {1, entry id} when appended; {0, dead-letter id} when the token is stale.
-- A drainer whose lease was taken over must not feed the processor any more. Its page was
-- already handed out by the provider, once and for all, so it is not dropped either: it goes to
-- the dead letters with reason drain_fenced, verbatim, for an operator to look at.
local current = redis.call('GET', KEYS[2])
if current and current == ARGV[1] then
  return {1, redis.call('XADD', KEYS[1], '*', 'page', ARGV[2], 'src', 'drain', 'fence', ARGV[1])}
end
local entry = cjson.encode({
  kind = 'report_page', reason = 'drain_fenced', at = ARGV[3], page = ARGV[2],
  detail = 'fencing token ' .. ARGV[1] .. ' is stale (current: ' .. tostring(current) .. ')',
})
return {0, redis.call('XADD', KEYS[3], '*', 'message_id', '', 'entry', entry)}
