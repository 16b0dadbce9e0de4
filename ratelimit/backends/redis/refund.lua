-- refund.lua: undo an admitted decide.lua call on one hash slot.
--
-- KEYS[1 .. n]  the state keys of the decide.lua call being undone
-- KEYS[n + 4k - 3 .. n + 4k]  the waiting line of the k-th lease check: line,
--          tickets, fair, meta (queue.lua)
-- ARGV     those of the decide.lua call, except ARGV[1]: the channel hand-offs
--          are published on
-- A window check's ARGV is kind, at, period, cost: `at` is the `now` of the
-- decide that took its units (the reply's stamp); they go back to the window
-- they went into (window.lua's w_refund).
-- Bucket checks get `cost` units back, lease checks are released (and their
-- freed slots handed to their line's head, if anyone waits). A negative cost
-- charges that many units more, past the limit if need be: a settlement's debt
-- (the change from a request's reserved cost to its actual one). Buckets run
-- refund() of ratelimit/algorithms/gcra.py in the same frame as decide.lua
-- (tat = (sec - now_sec) + offset, now = now_usec / 1e6); a bucket that is full
-- again is deleted. Returns the number of leases released.

local t = now_usec / 1000000
-- The longest a bucket in debt lives (ms, about 285,000 years): its tat may be far
-- off (2**53 units of a daily rate: 10**23 ms), but Redis takes an expiry only as an
-- integer under 2**63, and a Lua number from 1e17 on reaches it in exponent notation.
local MAX_TTL_MS = 2 ^ 53
local released = 0
local n = (#ARGV - 1) / 4
local line = n

for i = 1, n do
  local key = KEYS[i]
  local j = 4 * i - 2
  if ARGV[j] == 't' then
    local interval, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 3])
    local state = redis.call('GET', key)
    if (state and cost > 0) or cost < 0 then
      local tat = t
      if state then
        local sec, offset = string.match(state, '^(%S+) (%S+)$')
        tat = (tonumber(sec) - now_sec) + tonumber(offset)
        if tat < t then
          tat = t
        end
      end
      local new_tat = tat - cost * interval
      if new_tat <= t then
        redis.call('DEL', key)
      else
        local ms = math.ceil((new_tat - t) * 1000)
        if ms < 1 then
          ms = 1
        elseif ms > MAX_TTL_MS then
          ms = MAX_TTL_MS
        end
        set_expiring(key, string.format('%d %.17g', now_sec, new_tat), ms)
      end
    end
  elseif ARGV[j] ~= 'l' then
    w_refund(ARGV[j], key, tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]))
  else
    released = released + redis.call('ZREM', key, ARGV[j + 3])
    local Q = {leases = key, line = KEYS[line + 1], tickets = KEYS[line + 2],
               fair = KEYS[line + 3], meta = KEYS[line + 4]}
    line = line + 4
    if redis.call('EXISTS', Q.line) == 1 then
      q_hand_off(Q, ARGV[1])
    end
  end
end
return released
