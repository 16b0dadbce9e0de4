-- release.lua: free one lease's slot.
--
-- KEYS[1]  the lease table (sorted set)
-- ARGV[1]  the lease id
-- Returns 1 if the lease was held and live, 0 if it was not there (released
-- before) or already dead (expired: its slot was free anyway). Either way the id
-- is gone afterwards, so a second release returns 0.

local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(expiry) > now then
  return 1
end
return 0
