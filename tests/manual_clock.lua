-- manual_clock.lua: a test-only clock prelude, standing in for clock.lua.
--
-- It defines the names clock.lua defines (now_sec, now_usec, now, set_expiring,
-- keep_alive) from a time the test controls, so tests pin "now" while the
-- operation scripts run unchanged:
--   'ratelimit-test:clock'  a string "<sec> <usec>" the test SETs (integers)
--   'ratelimit-test:ttl'    a hash: key -> the ttl in ms the script asked for;
--                           keys get no real expiry, so they never vanish
--                           behind the manual clock's back.
-- These keys are undeclared (fine on a standalone test server, never in production).
local _clock = redis.call('GET', 'ratelimit-test:clock')
if not _clock then
  return redis.error_reply('manual clock not set: SET ratelimit-test:clock "<sec> <usec>"')
end
local _sec, _usec = string.match(_clock, '^(%d+) (%d+)$')
local now_sec = tonumber(_sec)
local now_usec = tonumber(_usec)
local now = now_sec + now_usec / 1000000

local function set_expiring(key, value, ms)
  redis.call('SET', key, value)
  redis.call('HSET', 'ratelimit-test:ttl', key, ms)
end

local function keep_alive(key, ms)
  local asked = tonumber(redis.call('HGET', 'ratelimit-test:ttl', key) or '-1')
  if asked < ms then
    redis.call('HSET', 'ratelimit-test:ttl', key, ms)
  end
end
