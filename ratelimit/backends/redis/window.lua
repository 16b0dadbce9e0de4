-- window.lua: window checks (ratelimit/algorithms/window.py, operation for operation),
-- for checks.lua (deciding) and refund.lua (giving back). After the clock prelude.
--
-- Times are absolute seconds (`now`, a double). A window's state, in its own key:
--   fixed    a string "<start> <count>", expiring when the window ends
--   sliding  a string "<index> <previous> <current>" (index = floor(now / period)),
--            expiring when both counts have left the sliding period (index + 2) * period
--   moving   a list of hit times, newest first, as '%.17g' text; entries at or
--            before now - period are dead and dropped from the tail; the list
--            lives one period after its newest entry
--   D, M     a calendar quota per UTC day or month (ratelimit/algorithms/calendar.py):
--            a string "<start> <count>", start the unix second its period began,
--            expiring at the period's end; `period` is not used
-- w_step(kind, key, limit, period, cost) returns admitted, remaining, retry_after,
-- reset_after and the new state (nil for a moving window: its commit pushes `now`).
-- No `%` anywhere: Lua's differs from Python's.

local function w_ms(seconds)
  local ms = math.ceil(seconds * 1000)
  if ms < 1 then
    ms = 1
  end
  return ms
end

local function w_fixed_read(key, period)
  local state = redis.call('GET', key)
  if state then
    local start, count = string.match(state, '^(%S+) (%S+)$')
    start = tonumber(start)
    if now < start + period then
      return start, tonumber(count)
    end
  end
  return nil, 0
end

local function w_fixed(key, limit, period, cost)
  local start, count = w_fixed_read(key, period)
  local open = start ~= nil
  if not open then
    start = now
  end
  if cost > 0 and count + cost > limit then
    local left = start + period - now
    return false, math.max(0, limit - count), left, open and left or 0
  end
  if cost > 0 then
    count = count + cost
    open = true
  end
  return true, math.max(0, limit - count), 0, open and (start + period - now) or 0,
    {start, count}
end

local function w_roll(key, index)
  local state = redis.call('GET', key)
  if state then
    local at, previous, current = string.match(state, '^(%S+) (%S+) (%S+)$')
    at, previous, current = tonumber(at), tonumber(previous), tonumber(current)
    if at == index then
      return previous, current
    elseif at == index - 1 then
      return current, 0
    end
  end
  return 0, 0
end

local function w_sliding_reset(previous, current, left, period)
  if previous == 0 and current == 0 then
    return 0
  end
  local reset = math.huge
  local in_window = left * period
  if previous > 0 then
    local step = period / previous
    reset = in_window - math.floor(in_window / step) * step
  end
  if current > 0 and in_window < reset then
    reset = in_window
  end
  return reset
end

local function w_sliding(key, limit, period, cost)
  local index = math.floor(now / period)
  local previous, current = w_roll(key, index)
  local left = (index + 1) - now / period
  local weighted = math.floor(previous * left + current)
  if cost > 0 and weighted + cost > limit then
    local target = limit - cost + 1
    local retry = period
    if target > 0 then
      local at
      if current < target then
        at = (index + 1) - (target - current) / previous
      else
        at = (index + 2) - target / current
      end
      retry = at * period - now
      if retry < 0 then
        retry = 0
      end
    end
    local remaining = limit - weighted
    if remaining < 0 then
      remaining = 0
    end
    return false, remaining, retry, w_sliding_reset(previous, current, left, period)
  end
  if cost > 0 then
    current = current + cost
    weighted = math.floor(previous * left + current)
  end
  local remaining = limit - weighted
  if remaining < 0 then
    remaining = 0
  end
  return true, remaining, 0, w_sliding_reset(previous, current, left, period),
    {index, previous, current}
end

local function w_moving(key, limit, period, cost)
  local edge = now - period
  while true do
    local last = redis.call('LINDEX', key, -1)
    if not last or tonumber(last) > edge then
      break
    end
    redis.call('RPOP', key)
  end
  local count = redis.call('LLEN', key)
  local reset = 0
  if cost > 0 and count + cost > limit then
    local retry = period
    if cost <= limit then
      retry = tonumber(redis.call('LINDEX', key, limit - cost)) + period - now
    end
    if count > 0 then
      reset = tonumber(redis.call('LINDEX', key, -1)) + period - now
    end
    return false, math.max(0, limit - count), retry, reset
  end
  if cost > 0 then
    count = count + cost
  end
  if count > 0 then
    local oldest = redis.call('LINDEX', key, -1)
    reset = (oldest and tonumber(oldest) or now) + period - now
  end
  return true, math.max(0, limit - count), 0, reset, {}
end

-- Days since 1970-01-01 of a Gregorian date, and back (H. Hinnant's algorithms).
local function w_days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then
    mp = m - 3
  end
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function w_civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor(
    (doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp - 9
  if mp < 10 then
    m = mp + 3
  end
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d
end

-- (start, end) in unix seconds of the UTC day ('D') or month ('M') containing `t`.
local function w_bounds(kind, t)
  local days = math.floor(t / 86400)
  if kind == 'D' then
    return days * 86400, (days + 1) * 86400
  end
  local y, m = w_civil_from_days(days)
  local start = w_days_from_civil(y, m, 1)
  local stop
  if m == 12 then
    stop = w_days_from_civil(y + 1, 1, 1)
  else
    stop = w_days_from_civil(y, m + 1, 1)
  end
  return start * 86400, stop * 86400
end

local function w_quota_count(key, start)
  local state = redis.call('GET', key)
  if state then
    local at, count = string.match(state, '^(%S+) (%S+)$')
    if tonumber(at) == start then
      return tonumber(count)
    end
  end
  return 0
end

local function w_quota(kind, key, limit, cost)
  local start, stop = w_bounds(kind, now)
  local count = w_quota_count(key, start)
  local left = stop - now
  if cost > 0 and count + cost > limit then
    return false, math.max(0, limit - count), left, left
  end
  if cost > 0 then
    count = count + cost
  end
  return true, math.max(0, limit - count), 0, left, {start, count, stop}
end

local W_STEPS = {
  f = w_fixed, s = w_sliding, m = w_moving,
  D = function(key, limit, period, cost) return w_quota('D', key, limit, cost) end,
  M = function(key, limit, period, cost) return w_quota('M', key, limit, cost) end,
}

local function w_step(kind, key, limit, period, cost)
  return W_STEPS[kind](key, limit, period, cost)
end

-- Store the state w_step computed (it admitted, cost > 0).
local function w_commit(kind, key, period, cost, state)
  if kind == 'f' then
    set_expiring(key, string.format('%.17g %d', state[1], state[2]), w_ms(state[1] + period - now))
  elseif kind == 's' then
    set_expiring(key, string.format('%d %d %d', state[1], state[2], state[3]),
      w_ms((state[1] + 2) * period - now))
  elseif kind == 'D' or kind == 'M' then
    set_expiring(key, string.format('%d %d', state[1], state[2]), w_ms(state[3] - now))
  else
    local stamp = string.format('%.17g', now)
    for _ = 1, cost do
      redis.call('LPUSH', key, stamp)
    end
    keep_alive(key, w_ms(period))
  end
end

-- Give back `cost` units hit at `at` (a decide's `now`) to the window they went into;
-- a negative cost charges them (a settlement's debt): to that window, or to the one
-- open now if it has closed (refund_* of ratelimit/algorithms/window.py).
local function w_refund(kind, key, at, period, cost)
  if kind == 'f' then
    local start, count = w_fixed_read(key, period)
    if start == nil and cost < 0 then
      start, count = now, 0
    end
    if start == nil then
      redis.call('DEL', key)
    elseif at >= start or cost < 0 then
      count = count - cost
      if count > 0 then
        set_expiring(key, string.format('%.17g %d', start, count), w_ms(start + period - now))
      else
        redis.call('DEL', key)
      end
    end
  elseif kind == 's' then
    local index = math.floor(now / period)
    local previous, current = w_roll(key, index)
    local hit = math.floor(at / period)
    if hit == index or cost < 0 then
      current = math.max(0, current - cost)
    elseif hit == index - 1 then
      previous = math.max(0, previous - cost)
    end
    if previous == 0 and current == 0 then
      redis.call('DEL', key)
    else
      set_expiring(key, string.format('%d %d %d', index, previous, current),
        w_ms((index + 2) * period - now))
    end
  elseif kind == 'D' or kind == 'M' then
    local start, stop = w_bounds(kind, now)
    local count = w_quota_count(key, start)
    if count == 0 and cost >= 0 then
      redis.call('DEL', key)
    elseif at >= start or cost < 0 then
      count = count - cost
      if count > 0 then
        set_expiring(key, string.format('%d %d', start, count), w_ms(stop - now))
      else
        redis.call('DEL', key)
      end
    end
  elseif cost < 0 then
    local stamp = string.format('%.17g', now)
    for _ = 1, -cost do
      redis.call('LPUSH', key, stamp)
    end
    keep_alive(key, w_ms(period))
  else
    local removed = redis.call('LREM', key, cost, string.format('%.17g', at))
    if at > now - period then
      for _ = removed + 1, cost do
        redis.call('LPOP', key)
      end
    end
  end
end
