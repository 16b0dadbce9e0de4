-- manual_clock_cluster.lua: tests/manual_clock.lua for Redis Cluster.
--
-- A cluster script may touch only keys of its own slot, so the clock and ttl
-- keys carry the hash tag of the call's first key (every key of a call shares
-- its slot): 'ratelimit-test:clock:{tag}' holds "<sec> <usec>", set by the test
-- backend before each call; 'ratelimit-test:ttl:{tag}' the asked ttls. Same
-- names defined as clock.lua and manual_clock.lua, so the operations run as is.
local _tag = string.match(KEYS[1], '{[^}]*}')
local _clock = redis.call('GET', 'ratelimit-test:clock:' .. _tag)
if not _clock then
  return redis.error_reply('manual clock not set for ' .. _tag)
end
local _sec, _usec = string.match(_clock, '^(%d+) (%d+)$')
local now_sec = tonumber(_sec)
local now_usec = tonumber(_usec)
local now = now_sec + now_usec / 1000000
local _ttl_key = 'ratelimit-test:ttl:' .. _tag

local function set_expiring(key, value, ms)
  redis.call('SET', key, value)
  redis.call('HSET', _ttl_key, key, ms)
end

local function keep_alive(key, ms)
  local asked = tonumber(redis.call('HGET', _ttl_key, key) or '-1')
  if asked < ms then
    redis.call('HSET', _ttl_key, key, ms)
  end
end
