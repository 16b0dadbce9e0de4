-- leave.lua: take a waiter out of line (timeout, disconnect, cancellation).
--
-- KEYS[1]     the lease table (sorted set)
-- KEYS[2..5]  its waiting line: line, tickets, fair, meta (queue.lua)
-- ARGV[1]  the waiter's member in line (from enqueue.lua)
-- ARGV[2]  "1": if the ticket was granted meanwhile, release that slot (and
--          hand it to the line's head); "0": keep it (the caller takes the lease)
-- ARGV[3]  the channel hand-offs are published on
-- Returns 0 if it left the line, 1 if it had been granted and still holds the
-- lease (ARGV[2] "0"), 2 if it had been granted and the slot was released, -1
-- if it was gone (shed or expired: it holds nothing).

local Q = {leases = KEYS[1], line = KEYS[2], tickets = KEYS[3], fair = KEYS[4], meta = KEYS[5]}
local member = ARGV[1]
if q_remove(Q, member) then
  return 0
end
local _, _, _, ticket = q_parse(member)
local lease = redis.call('ZSCORE', Q.leases, ticket)
if not (lease and tonumber(lease) > now) then
  return -1
end
if ARGV[2] ~= '1' then
  return 1
end
redis.call('ZREM', Q.leases, ticket)
if redis.call('EXISTS', Q.line) == 1 then
  q_hand_off(Q, ARGV[3])
end
return 2
