-- checks.lua: deciding a rule's checks on one hash slot, shared by decide.lua and
-- enqueue.lua (prepended to them after the clock prelude; see scripts.py).
--
-- Layout: check i (1..n) has its state in KEYS[i] and four ARGV from
-- ARGV[base + 4i - 3]: "t", interval, burst, cost (a GCRA bucket of `burst` units
-- refilling one per `interval` seconds, a double; take `cost` units) or "l",
-- limit, ttl, lease_id (at most `limit` live leases; add `lease_id` expiring `ttl`
-- seconds, a double, from now). After the n state keys come the waiting lines of
-- the lease checks, one key per lease check in check order (see queue.lua): a
-- lease never admits while its line is non-empty, so nobody passes a line.
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

-- Evaluate every check without consuming: a table C of per-check results
-- (ok, remaining, retry, reset), what committing needs (tats, new_tats), the
-- verdict, and lines[i], the line key of lease check i.
local function evaluate(base, n)
  local t = now_usec / 1000000
  local C = {base = base, n = n, verdict = true, ok = {}, remaining = {}, retry = {},
             reset = {}, tats = {}, new_tats = {}, lines = {}}
  local line = n
  local now_text = string.format('%.17g', now)
  for i = 1, n do
    local key = KEYS[i]
    local j = base + 4 * i - 3
    if ARGV[j] == 't' then
      local interval, burst, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
      local state = redis.call('GET', key)
      local tat = nil
      if state then
        local sec, offset = string.match(state, '^(%S+) (%S+)$')
        tat = (tonumber(sec) - now_sec) + tonumber(offset)
      end
      C.tats[i] = tat
      C.ok[i], C.new_tats[i], C.remaining[i], C.retry[i], C.reset[i] = gcra(tat, t, cost, interval, burst)
    else
      line = line + 1
      C.lines[i] = KEYS[line]
      local limit = tonumber(ARGV[j + 1])
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now_text)
      local in_use = redis.call('ZCARD', key)
      -- The line is looked at only when a slot is free: a full pool pays nothing for it.
      local ok = in_use < limit and redis.call('EXISTS', KEYS[line]) == 0
      C.ok[i] = ok
      if ok then
        C.remaining[i] = limit - in_use - 1
      else
        C.remaining[i] = 0
      end
      C.retry[i], C.reset[i] = 0, 0
    end
    C.verdict = C.verdict and C.ok[i]
  end
  return C
end

-- Make an admitting check i report the untouched state (no cost taken, no lease added).
local function untouched(C, i)
  if not C.ok[i] then
    return
  end
  local j = C.base + 4 * i - 3
  if ARGV[j] == 't' then
    local _
    _, _, C.remaining[i], _, C.reset[i] = gcra(
      C.tats[i], now_usec / 1000000, 0, tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]))
  else
    C.remaining[i] = C.remaining[i] + 1
  end
end

-- Consume check i as evaluated (it admitted).
local function commit(C, i)
  local key = KEYS[i]
  local j = C.base + 4 * i - 3
  if ARGV[j] == 't' then
    if tonumber(ARGV[j + 3]) > 0 then
      local ms = math.ceil(C.reset[i] * 1000)
      if ms < 1 then
        ms = 1
      end
      set_expiring(key, string.format('%d %.17g', now_sec, C.new_tats[i]), ms)
    end
  else
    local ttl = tonumber(ARGV[j + 2])
    redis.call('ZADD', key, string.format('%.17g', now + ttl), ARGV[j + 3])
    keep_alive(key, math.ceil(ttl * 1000))
  end
end

-- Append {admitted_i, remaining_i, retry_after_i, reset_after_i} for every check to
-- `out`: admitted 1 or 0, remaining whole units, seconds as '%.17g' strings (a Lua
-- number in a reply is truncated to an integer; these must round-trip exactly).
local function results(C, out)
  local k = #out
  for i = 1, C.n do
    out[k + 1] = C.ok[i] and 1 or 0
    out[k + 2] = C.remaining[i]
    out[k + 3] = string.format('%.17g', C.retry[i])
    out[k + 4] = string.format('%.17g', C.reset[i])
    k = k + 4
  end
  return out
end
