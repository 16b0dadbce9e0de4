-- clock.lua: the clock prelude, prepended to every operation script (see scripts.py).
--
-- Production time is the server's TIME: one clock for the whole fleet, never a
-- client's. A prelude defines, for the operation that follows:
--   now_sec, now_usec       TIME's whole seconds and microseconds (integers)
--   now                     seconds since the epoch, a double computed exactly like
--                           Python's float(now_sec) + now_usec / 1e6
--   set_expiring(key, value, ms)   SET key to value, expiring in ms milliseconds
--   keep_alive(key, ms)            make key live at least ms more milliseconds
-- The operation scripts use nothing else that depends on time. Tests prepend a
-- manual clock instead (tests/manual_clock.lua), defining the same names from a
-- time they set, so the production scripts take no "now" argument at all.
local _time = redis.call('TIME')
local now_sec = tonumber(_time[1])
local now_usec = tonumber(_time[2])
local now = now_sec + now_usec / 1000000

local function set_expiring(key, value, ms)
  redis.call('SET', key, value, 'PX', ms)
end

local function keep_alive(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end
