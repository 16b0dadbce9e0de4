-- decide.lua: decide a rule's checks on one hash slot, all or nothing.
--
-- KEYS[i]  the state of check i: a GCRA bucket (string) or a lease table (sorted
--          set). Keys are distinct and share one hash tag.
-- ARGV[1]  "1": consume if every check admits; "0": dry run, never consume (the
--          backend's report of untouched state after another slot refused).
-- ARGV[4i-2 .. 4i+1], check i, one of:
--   "t", interval, burst, cost   a bucket of `burst` units refilling one unit per
--                                `interval` seconds (a double); take `cost` units
--   "l", limit, ttl, lease_id    at most `limit` live leases; add `lease_id`,
--                                expiring `ttl` seconds (a double) from now
-- Returns {verdict, admitted_1, remaining_1, retry_after_1, reset_after_1, ...}:
-- verdict and admitted_i are 1 or 0, remaining_i whole units (free slots for a
-- lease), retry_after_i and reset_after_i seconds as '%.17g' strings (a Lua
-- number in a reply is truncated to an integer; these must round-trip exactly).
-- When the verdict is 0 nothing is consumed and a check that would have admitted
-- reports the untouched state (no cost taken, no lease added).
--
-- Buckets run gcra() of ratelimit/algorithms/gcra.py, operation for operation.
-- The state is the tat stored as "<sec> <offset>" meaning sec + offset seconds,
-- and each call computes in a frame whose origin is now_sec: tat = (sec - now_sec)
-- + offset and now = now_usec / 1e6. Every float then stays near the bucket's own
-- size, so EPSILON (1e-9 s) keeps its meaning; at epoch scale one ulp is 2.4e-7 s
-- and `remaining` would be off by one half the time. A bucket key expires when
-- the bucket is full again (ms rounded up), so idle callers cost no memory.
--
-- Leases run acquire() of ratelimit/algorithms/leases.py on absolute times: the
-- sorted set scores each lease id by its expiry (now + ttl); dead leases (expiry
-- <= now) are dropped first; the set lives as long as its longest lease.

local EPSILON = 1e-9

local function units(free, interval)
  if free <= 0 then
    return 0
  end
  local u = math.floor(free / interval + EPSILON)
  if u < 0 then
    return 0
  end
  return u
end

-- gcra(tat, t, cost, interval, burst) -> admitted, new_tat, remaining, retry_after, reset_after
local function gcra(tat, t, cost, interval, burst)
  local base = tat
  if tat == nil or tat < t then
    base = t
  end
  local capacity = burst * interval
  local new_tat = base + cost * interval
  local allow_at = new_tat - capacity
  if cost > 0 and allow_at > t + EPSILON then
    local used = base - t
    return false, base, units(capacity - used, interval), allow_at - t, used
  end
  local used = new_tat - t
  return true, new_tat, units(capacity - used, interval), 0, used
end

local commit = ARGV[1] == '1'
local t = now_usec / 1000000
local n = #KEYS
local verdict = true
local ok, remaining, retry, reset = {}, {}, {}, {}
local tats, new_tats = {}, {}

for i = 1, n do
  local key = KEYS[i]
  local j = 4 * i - 2
  if ARGV[j] == 't' then
    local interval, burst, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
    local state = redis.call('GET', key)
    local tat = nil
    if state then
      local sec, offset = string.match(state, '^(%S+) (%S+)$')
      tat = (tonumber(sec) - now_sec) + tonumber(offset)
    end
    tats[i] = tat
    ok[i], new_tats[i], remaining[i], retry[i], reset[i] = gcra(tat, t, cost, interval, burst)
  else
    local limit = tonumber(ARGV[j + 1])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.17g', now))
    local in_use = redis.call('ZCARD', key)
    ok[i] = in_use < limit
    local left = limit - in_use
    if ok[i] then
      left = left - 1
    end
    if left < 0 then
      left = 0
    end
    remaining[i], retry[i], reset[i] = left, 0, 0
  end
  verdict = verdict and ok[i]
end

if not (verdict and commit) then
  -- Nothing is consumed: checks that would admit report the untouched state.
  for i = 1, n do
    if ok[i] then
      local j = 4 * i - 2
      if ARGV[j] == 't' then
        local _
        _, _, remaining[i], _, reset[i] = gcra(
          tats[i], t, 0, tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]))
      else
        remaining[i] = remaining[i] + 1
      end
    end
  end
else
  for i = 1, n do
    local key = KEYS[i]
    local j = 4 * i - 2
    if ARGV[j] == 't' then
      if tonumber(ARGV[j + 3]) > 0 then
        local ms = math.ceil(reset[i] * 1000)
        if ms < 1 then
          ms = 1
        end
        set_expiring(key, string.format('%d %.17g', now_sec, new_tats[i]), ms)
      end
    else
      local ttl = tonumber(ARGV[j + 2])
      redis.call('ZADD', key, string.format('%.17g', now + ttl), ARGV[j + 3])
      keep_alive(key, math.ceil(ttl * 1000))
    end
  end
end

local out = {verdict and 1 or 0}
for i = 1, n do
  local k = 4 * i - 2
  out[k] = ok[i] and 1 or 0
  out[k + 1] = remaining[i]
  out[k + 2] = string.format('%.17g', retry[i])
  out[k + 3] = string.format('%.17g', reset[i])
end
return out
