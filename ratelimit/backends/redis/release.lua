-- release.lua: free one lease's slot, and hand free slots to its line's head.
--
-- KEYS[1]  the lease table (sorted set)
-- KEYS[2..5]  its waiting line: line, tickets, fair, meta (queue.lua)
-- ARGV[1]  the lease id
-- ARGV[2]  the channel hand-offs are published on
-- Returns 1 if the lease was held and live, 0 if it was not there (released
-- before) or already dead (expired: its slot was free anyway). Either way the id
-- is gone afterwards, so a second release returns 0. If anyone waits, the freed
-- slot (and any other free one) goes to the line's head (queue.lua q_hand_off).

local Q = {leases = KEYS[1], line = KEYS[2], tickets = KEYS[3], fair = KEYS[4], meta = KEYS[5]}
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
if redis.call('EXISTS', Q.line) == 1 then
  q_hand_off(Q, ARGV[2])
end
if expiry and tonumber(expiry) > now then
  return 1
end
return 0
