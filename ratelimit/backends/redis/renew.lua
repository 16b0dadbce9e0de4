-- renew.lua: extend live leases on one hash slot.
--
-- KEYS[i]       the lease table (sorted set) of lease i; keys may repeat.
-- ARGV[2i - 1]  lease i's ttl in seconds (a double)
-- ARGV[2i]      lease i's id
-- Returns {1 or 0, ...}: 1 if lease i was live and now expires at now + ttl, 0 if
-- it was gone or dead (a dead one is dropped). renew() of
-- ratelimit/algorithms/leases.py on absolute times; the set lives as long as its
-- longest lease.

local out = {}
for i = 1, #KEYS do
  local key, ttl, lease = KEYS[i], tonumber(ARGV[2 * i - 1]), ARGV[2 * i]
  local expiry = redis.call('ZSCORE', key, lease)
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', key, 'XX', string.format('%.17g', now + ttl), lease)
    keep_alive(key, math.ceil(ttl * 1000))
    out[i] = 1
  else
    if expiry then
      redis.call('ZREM', key, lease)
    end
    out[i] = 0
  end
end
return out
