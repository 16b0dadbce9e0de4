-- refund.lua: undo an admitted decide.lua call on one hash slot.
--
-- KEYS and ARGV are exactly those of the decide.lua call being undone (ARGV[1]
-- is ignored): bucket checks get `cost` units back, lease checks are released.
-- Buckets run refund() of ratelimit/algorithms/gcra.py in the same frame as
-- decide.lua (tat = (sec - now_sec) + offset, now = now_usec / 1e6); a bucket
-- that is full again is deleted. Returns the number of leases released.

local t = now_usec / 1000000
local released = 0

for i = 1, #KEYS do
  local key = KEYS[i]
  local j = 4 * i - 2
  if ARGV[j] == 't' then
    local interval, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 3])
    local state = redis.call('GET', key)
    if state and cost > 0 then
      local sec, offset = string.match(state, '^(%S+) (%S+)$')
      local tat = (tonumber(sec) - now_sec) + tonumber(offset)
      local new_tat = tat - cost * interval
      if new_tat <= t then
        redis.call('DEL', key)
      else
        local ms = math.ceil((new_tat - t) * 1000)
        if ms < 1 then
          ms = 1
        end
        set_expiring(key, string.format('%d %.17g', now_sec, new_tat), ms)
      end
    end
  else
    released = released + redis.call('ZREM', key, ARGV[j + 3])
  end
end
return released
