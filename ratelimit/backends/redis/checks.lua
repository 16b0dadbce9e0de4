-- checks.lua: deciding a rule's checks on one hash slot, shared by decide.lua and
-- enqueue.lua (prepended to them after the clock prelude; see scripts.py).
--
-- Layout: check i (1..n) has its state in KEYS[i] and four ARGV from
-- ARGV[base + 4i - 3]: "t", interval, burst, cost (a GCRA bucket of `burst` units
-- refilling one per `interval` seconds, a double; take `cost` units), "l",
-- limit, ttl, lease_id (at most `limit` live leases; add `lease_id` expiring `ttl`
-- seconds, a double, from now) or a window: "f" (fixed), "s" (sliding) or "m"
-- (moving), limit, period, cost (at most `limit` units per `period` seconds, a
-- double; see window.lua, prepended before this file). After the n state keys come the waiting lines of
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
-- This runs on every decision, so it is written for Redis's CPU: one small array
-- per check, numbers handed to redis.call as numbers (Redis writes them as
-- '%.17g' text, which reads back as the same double), the reply packed as
-- doubles. Each redis.call, string.format and table costs microseconds here.
--
-- Leases run acquire() of ratelimit/algorithms/leases.py on absolute times: the
-- sorted set scores each lease id by its expiry (now + ttl); dead leases (expiry
-- <= now) are dropped first; the set lives as long as its longest lease. A lease
-- of a weighted pool needs its weight in free slots (leases.lua); an unweighted
-- one, one slot, counted by ZCARD.

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
  local used = 0.0
  if tat ~= nil and tat > t then
    used = tat - t
  end
  local capacity = burst * interval
  local after = used + cost * interval
  if cost > 0 and after - capacity > EPSILON then
    local base = t
    if tat ~= nil and tat >= t then
      base = tat
    end
    return false, base, units(capacity - used, interval), after - capacity, used
  end
  return true, t + after, units(capacity - after, interval), 0, after
end

-- The tat stored in bucket `key`, in the frame of now_sec (nil: no state, a full bucket).
local function read_tat(key)
  local state = redis.call('GET', key)
  if state then
    local sec, offset = string.match(state, '^(%S+) (%S+)$')
    return (tonumber(sec) - now_sec) + tonumber(offset)
  end
  return nil
end

-- Store bucket `key`'s tat (in the frame of now_sec) as "<now_sec> <tat>", expiring when
-- the bucket is full again, `full_in` seconds from now (ms rounded up, at least 1).
local function write_tat(key, tat, full_in)
  local ms = math.ceil(full_in * 1000)
  if ms < 1 then
    ms = 1
  end
  set_expiring(key, string.format('%d %.17g', now_sec, tat), ms)
end

-- Evaluate every check without consuming. Returns C: C.verdict (every check
-- admits), C.n, C.base, and for check i the array C[i] = {admitted, remaining,
-- retry_after, reset_after, ...}: for a bucket then its tat before and after
-- taking, interval, burst and cost (what untouched() and commit() need).
-- One small array per check, no per-call format: this runs on every decision.
local function evaluate(base, n)
  local t = now_usec / 1000000
  local C = {base = base, n = n, verdict = true}
  local line = n
  for i = 1, n do
    local key = KEYS[i]
    local j = base + 4 * i - 3
    local kind = ARGV[j]
    if kind == 't' then
      local interval, burst, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
      local tat = read_tat(key)
      local ok, new_tat, remaining, retry, reset = gcra(tat, t, cost, interval, burst)
      C[i] = {ok, remaining, retry, reset, tat, new_tat, interval, burst, cost}
      if not ok then
        C.verdict = false
      end
    elseif kind ~= 'l' then
      local limit, period, cost = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
      local ok, remaining, retry, reset, state = w_step(kind, key, limit, period, cost)
      C[i] = {ok, remaining, retry, reset, w = {kind, limit, period, cost, state}}
      if not ok then
        C.verdict = false
      end
    else
      line = line + 1
      local limit = tonumber(ARGV[j + 1])
      -- Numbers reach Redis as '%.17g' text, read back as the same double.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      local in_use, need = 0, 1
      if l_marked(ARGV[j + 3]) then  -- a weighted pool's lease (leases.lua)
        in_use, need = l_held(key), l_weight(ARGV[j + 3])
      else
        in_use = redis.call('ZCARD', key)
      end
      -- The line is looked at only when a slot is free: a full pool pays nothing for it.
      if in_use + need <= limit and redis.call('EXISTS', KEYS[line]) == 0 then
        C[i] = {true, limit - in_use - need, 0, 0}
      else
        C[i] = {false, 0, 0, 0}
        C.verdict = false
      end
    end
  end
  return C
end

-- Make an admitting check i report the untouched state (no cost taken, no lease added).
local function untouched(C, i)
  local R = C[i]
  if not R[1] then
    return
  end
  local W = R.w
  if W then
    local _
    _, R[2], _, R[4] = w_step(W[1], KEYS[i], W[2], W[3], 0)
  elseif R[7] then  -- a bucket: its interval
    local _
    _, _, R[2], _, R[4] = gcra(R[5], now_usec / 1000000, 0, R[7], R[8])
  else
    R[2] = R[2] + l_weight(ARGV[C.base + 4 * i])
  end
end

-- Consume check i as evaluated (it admitted).
local function commit(C, i)
  local R = C[i]
  local W = R.w
  if W then
    if W[4] > 0 then
      w_commit(W[1], KEYS[i], W[3], W[4], W[5])
      C.stamp = true
    end
  elseif R[7] then
    if R[9] > 0 then
      write_tat(KEYS[i], R[6], R[4])
    end
  else
    local j = C.base + 4 * i - 3
    local ttl = tonumber(ARGV[j + 2])
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[j + 3])
    keep_alive(KEYS[i], math.ceil(ttl * 1000))
  end
end

-- The verdict and every check's {admitted, remaining, retry_after, reset_after} as
-- one string of little-endian doubles (struct '<d'): verdict and admitted 1 or 0,
-- remaining whole units, seconds exact (a Lua number in a reply is truncated to an
-- integer; '%.17g' text is exact too but costs several times more to make and read).
-- If a window check was committed, one more double follows: `now`, the time its
-- units were taken at (the backend keeps it for a refund; see WindowCheck.receipt).
local function results(C)
  local out = {C.verdict and 1 or 0}
  local k = 1
  for i = 1, C.n do
    local R = C[i]
    out[k + 1] = R[1] and 1 or 0
    out[k + 2] = R[2]
    out[k + 3] = R[3]
    out[k + 4] = R[4]
    k = k + 4
  end
  if C.stamp then
    out[k + 1] = now
    k = k + 1
  end
  return struct.pack('<' .. string.rep('d', k), unpack(out))
end
