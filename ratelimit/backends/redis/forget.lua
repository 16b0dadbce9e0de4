-- forget.lua: undo a call whose outcome this process never learned (a "ghost").
--
-- KEYS[1]     the lease table (sorted set)
-- KEYS[2..5]  its waiting line: line, tickets, fair, meta (queue.lua)
-- ARGV[1]  the lease or ticket id the call proposed
-- ARGV[2]  the channel hand-offs are published on
-- A decide.lua or enqueue.lua call whose reply was lost (timeout, dropped
-- connection, cancelled caller) may have run: its lease, or its ticket in line,
-- is then held by nobody. This takes the ticket out of line if it is there and
-- frees the lease if it is held, then hands free slots to the line's head, as
-- release.lua does. Idempotent: an id that is not there changes nothing.
-- Returns 1 if something was taken back, else 0.

local Q = {leases = KEYS[1], line = KEYS[2], tickets = KEYS[3], fair = KEYS[4], meta = KEYS[5]}
local id = ARGV[1]
local found = 0
if redis.call('EXISTS', Q.tickets) == 1 then
  local suffix = '|' .. id
  for _, member in ipairs(redis.call('ZRANGE', Q.tickets, 0, -1)) do
    if string.sub(member, -#suffix) == suffix then
      q_remove(Q, member)
      found = 1
      break
    end
  end
end
if redis.call('ZREM', Q.leases, id) == 1 then
  found = 1
end
if redis.call('EXISTS', Q.line) == 1 then
  q_hand_off(Q, ARGV[2])
end
return found
