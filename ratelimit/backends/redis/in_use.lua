-- in_use.lua: count live leases (expiry > now) in one lease table.
--
-- KEYS[1]  the lease table (sorted set)
-- Returns the count (an integer). Read-only: dead leases are left for the next
-- acquire to drop.

return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.17g', now), '+inf')
