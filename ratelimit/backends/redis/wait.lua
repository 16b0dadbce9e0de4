-- wait.lua: a waiter's poll (the safety net under pub/sub) and heartbeat.
--
-- KEYS[1]     the lease table (sorted set)
-- KEYS[2..5]  its waiting line: line, tickets, fair, meta (queue.lua)
-- ARGV[1]  the waiter's member in line (from enqueue.lua)
-- ARGV[2]  seconds (a double) its ticket may live without another heartbeat
-- ARGV[3]  the channel hand-offs are published on
-- First the line is served as a release would serve it (expired tickets
-- dropped, dead leases pruned, free slots handed to the head: slots freed by a
-- lease's expiry, not a release, reach the line here). Then returns
-- {1, -1} granted (the ticket is a live lease), {0, position} still waiting
-- (its ticket now expires ARGV[2] s from now), or {-1, -1} gone (shed, or
-- expired: it holds nothing).

local Q = {leases = KEYS[1], line = KEYS[2], tickets = KEYS[3], fair = KEYS[4], meta = KEYS[5]}
local member = ARGV[1]
local _, _, _, ticket = q_parse(member)
if redis.call('EXISTS', Q.line) == 1 then
  q_hand_off(Q, ARGV[3])
end
local lease = redis.call('ZSCORE', Q.leases, ticket)
if lease and tonumber(lease) > now then
  return {1, -1}
end
if redis.call('ZSCORE', Q.tickets, member) then
  local expiry = now + tonumber(ARGV[2])
  redis.call('ZADD', Q.tickets, 'XX', string.format('%.17g', expiry), member)
  q_keep(Q, expiry)
  return {0, redis.call('ZRANK', Q.line, member)}
end
return {-1, -1}
