-- in_use.lua: count the slots held by live leases (expiry > now) in one lease table.
--
-- KEYS[1]  the lease table (sorted set)
-- Returns the count (an integer): leases' weights summed (leases.lua), so for an
-- unweighted pool the number of live leases. Read-only: dead leases are left for
-- the next acquire to drop.

local live = '(' .. string.format('%.17g', now)
local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not (first and l_marked(first)) then
  return redis.call('ZCOUNT', KEYS[1], live, '+inf')
end
local total = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], live, '+inf')) do
  total = total + l_weight(id)
end
return total
