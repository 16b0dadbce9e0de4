-- appoint.lua: an appointment for a request that left the line without a slot
-- (timed out, shed). QueueBackend.appoint of ratelimit/backends/base.py, as
-- MemoryBackend.appoint runs it on the pure Book (book.lua).
--
-- KEYS[1]     the line's tickets (sorted set, member -> expiry; queue.lua): its
--             live tickets are the line's length
-- KEYS[2..4]  the book: due, ranks, meta (book.lua)
-- ARGV[1]  the request's class rank (0 first)
-- ARGV[2]  its fair key (non-empty)
-- ARGV[3]  spacing: seconds between appointments (a double > 0)
-- Returns the appointment as seconds from now, a '%.17g' string ("0" for none:
-- the book is full). The first free one is (line length + 1) * spacing from now.
-- Expired tickets are only counted out here: the next script serving the line
-- drops them.

local B = {due = KEYS[2], ranks = KEYS[3], meta = KEYS[4]}
local rank, fair, spacing = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local grace = b_grace(spacing)
b_prune(B, grace)
local length = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.17g', now), '+inf')
local due = b_give(B, fair, rank, now + (length + 1) * spacing, spacing)
b_close(B, grace)
if due == 0 then
  return '0'
end
return string.format('%.17g', due - now)
