-- queue_length.lua: count the waiters of one line whose ticket is live.
--
-- KEYS[1]  the line's tickets (sorted set, member -> expiry; queue.lua)
-- Returns the count (an integer). Read-only: expired tickets are left for the
-- next script that serves the line to drop.

return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.17g', now), '+inf')
