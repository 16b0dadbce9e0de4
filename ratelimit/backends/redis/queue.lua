-- queue.lua: a waiting line's steps, shared by the scripts that touch one
-- (enqueue, release, refund, wait, leave, forget; prepended after the clock
-- prelude and leases.lua, see scripts.py). They are the steps of
-- ratelimit/algorithms/queue.py, which the tests hold these scripts to.
--
-- A line lives in four keys sharing its lease table's hash tag (keyspace.py),
-- passed to each script as a table Q = {leases, line, tickets, fair, meta}:
--   line     sorted set; every member is scored 0, so members sort by their
--            text "<sort key>|<fair>|<ticket>" (sort key: rank 4 digits, n 10,
--            seq 12, as queue.sort_key; seq is unique, so the text after the
--            sort key never decides the order)
--   tickets  sorted set: the same members scored by the ticket's expiry, in
--            seconds since the epoch (server time). A ticket whose expiry has
--            passed belongs to a worker that stopped heart-beating (it died): it
--            is dropped before any hand-off.
--   fair     hash: fair key -> requests of that caller waiting now
--   meta     hash: 'seq' (last arrival number), 'r<rank>' (the class's round:
--            the n of its last admitted waiter), 'ph' and 'pp' (the ticket of the
--            head lighter waiters last passed in a weighted pool, and the slots
--            that went past it: queue.py's Weights), and what a hand-off needs:
--            'limit', 'ttl' (lease seconds) and 'g' (guaranteed slots as
--            "rank slots rank slots ...")
-- The four are deleted together when the line empties (a fresh QueueState), and
-- kept alive together QUEUE_MARGIN_MS past the latest ticket expiry, so a
-- fleet that died while waiting leaves nothing behind.
--
-- Hand-offs and sheds are PUBLISHed on the backend's channel (ARGV) as
-- "g <ticket> <ticket> ..." (granted: the ticket is now a lease) and
-- "s <ticket> ..." (shed or expired: it left the line), so the waiter's process
-- wakes it at once; a slow poll (wait.lua) catches anything a message missed.

local QUEUE_MARGIN_MS = 1000

local function q_rank_of(id)
  local head = string.match(id, '^(%d%d%d%d)~')
  if head then
    return tonumber(head)
  end
  return -1
end

-- rank, n, fair, ticket of a line member
local function q_parse(member)
  local fair, ticket = string.match(string.sub(member, 28), '^([^|]*)|(.*)$')
  return tonumber(string.sub(member, 1, 4)), tonumber(string.sub(member, 5, 14)), fair, ticket
end

local function q_sort_key(rank, n, seq)
  return string.format('%04d%010d%012d', rank, n, seq)
end

local function q_guaranteed(text)
  local g = {}
  local any = false
  for rank, slots in string.gmatch(text or '', '(%d+) (%d+)') do
    g[tonumber(rank)] = tonumber(slots)
    any = true
  end
  if any then
    return g
  end
  return nil
end

-- Slots held per class, from the live leases' ids, weights summed (leases pruned by
-- the caller).
local function q_in_use_by_rank(leases)
  local by_rank = {}
  for _, id in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    local rank = q_rank_of(id)
    by_rank[rank] = (by_rank[rank] or 0) + l_weight(id)
  end
  return by_rank
end

local function q_claims(rank, ahead_in_class, in_use, g)
  return (in_use[rank] or 0) + ahead_in_class < ((g and g[rank]) or 0)
end

local function q_publish(channel, kind, tickets)
  if #tickets > 0 then
    redis.call('PUBLISH', channel, kind .. ' ' .. table.concat(tickets, ' '))
  end
end

-- Keep the line's keys alive until `expiry` (seconds, server time) plus a margin.
local function q_keep(Q, expiry)
  local ms = math.ceil((expiry - now) * 1000) + QUEUE_MARGIN_MS
  keep_alive(Q.line, ms)
  keep_alive(Q.tickets, ms)
  keep_alive(Q.fair, ms)
  keep_alive(Q.meta, ms)
end

-- Take a member out of line (left, shed, expired or admitted); false if absent.
-- An emptied line's keys go: the next waiter starts a fresh line (seq 0, no rounds).
local function q_remove(Q, member)
  if redis.call('ZREM', Q.line, member) == 0 then
    return false
  end
  redis.call('ZREM', Q.tickets, member)
  local _, _, fair = q_parse(member)
  if redis.call('HINCRBY', Q.fair, fair, -1) <= 0 then
    redis.call('HDEL', Q.fair, fair)
  end
  if redis.call('EXISTS', Q.line) == 0 then
    redis.call('DEL', Q.tickets, Q.fair, Q.meta)
  end
  return true
end

-- Drop tickets whose expiry has passed (dead workers) and publish them as shed.
local function q_drop_expired(Q, channel)
  local dead = redis.call('ZRANGEBYSCORE', Q.tickets, '-inf', string.format('%.17g', now))
  local gone = {}
  for _, member in ipairs(dead) do
    q_remove(Q, member)
    local _, _, _, ticket = q_parse(member)
    gone[#gone + 1] = ticket
  end
  q_publish(channel, 's', gone)
end

-- queue._fitting: which of `members` (the line's first, in order) `free` slots go to
-- when members[head] is next: the head if it fits, else the first of the first
-- BACKFILL_SCAN that fits within the head's budget (meta 'ph': the ticket of the
-- head last passed, 'pp': the slots that went past it); nil for none.
local BACKFILL_SCAN = 32
local function q_fitting(Q, members, head, free, limit)
  local _, _, _, ticket = q_parse(members[head])
  local need = l_weight(ticket)
  if need <= free then
    return head
  end
  local meta = redis.call('HMGET', Q.meta, 'ph', 'pp')
  local passed = 0
  if meta[1] == ticket then
    passed = tonumber(meta[2])
  end
  local budget = free  -- a head that can never fit reserves nothing
  if need <= limit then
    budget = limit - passed
  end
  for j = 1, math.min(#members, BACKFILL_SCAN) do
    if j ~= head then
      local _, _, _, other = q_parse(members[j])
      local weight = l_weight(other)
      if weight <= free and weight <= budget then
        redis.call('HSET', Q.meta, 'ph', ticket, 'pp', passed + weight)
        return j
      end
    end
  end
  return nil
end

-- Give free slots to the line's waiters (queue.hand_off, as memory's _hand_off runs
-- it): expired tickets go first, dead leases are pruned, then the free slots go to
-- the first waiter whose class is under its guarantee, else to the head; in a
-- weighted pool (marked tickets, leases.lua) a head that does not fit may be passed
-- by lighter waiters within its budget (q_fitting). A granted ticket becomes a lease
-- for the line's lease ttl and its class's round moves to its n. Publishes the
-- granted tickets.
local function q_hand_off(Q, channel)
  q_drop_expired(Q, channel)
  if redis.call('EXISTS', Q.line) == 0 then
    return
  end
  local config = redis.call('HMGET', Q.meta, 'limit', 'ttl', 'g')
  local limit, ttl, g = tonumber(config[1]), tonumber(config[2]), q_guaranteed(config[3])
  if limit == nil or ttl == nil then
    return  -- no config: not a line this library wrote
  end
  redis.call('ZREMRANGEBYSCORE', Q.leases, '-inf', string.format('%.17g', now))
  local weighted = l_marked(redis.call('ZRANGE', Q.line, 0, 0)[1])
  local in_use
  if weighted then
    in_use = l_held(Q.leases)
  else
    in_use = redis.call('ZCARD', Q.leases)
  end
  local by_rank = {}
  if g then
    by_rank = q_in_use_by_rank(Q.leases)
  end
  local granted = {}
  while in_use < limit do
    local members
    if g then
      members = redis.call('ZRANGE', Q.line, 0, -1)
    elseif weighted then
      members = redis.call('ZRANGE', Q.line, 0, BACKFILL_SCAN - 1)
    else
      members = redis.call('ZRANGE', Q.line, 0, 0)
    end
    if #members == 0 then
      break
    end
    local i = 1
    if g then
      for k, member in ipairs(members) do
        local rank = tonumber(string.sub(member, 1, 4))
        if (by_rank[rank] or 0) < (g[rank] or 0) then
          i = k
          break
        end
      end
    end
    if weighted then
      i = q_fitting(Q, members, i, limit - in_use, limit)
      if not i then
        break
      end
    end
    local pick = members[i]
    local rank, n, _, ticket = q_parse(pick)
    q_remove(Q, pick)
    if redis.call('EXISTS', Q.line) == 1 then
      local round = tonumber(redis.call('HGET', Q.meta, 'r' .. rank) or '0')
      if n > round then
        redis.call('HSET', Q.meta, 'r' .. rank, n)
      end
    end
    redis.call('ZADD', Q.leases, string.format('%.17g', now + ttl), ticket)
    keep_alive(Q.leases, math.ceil(ttl * 1000))
    local weight = l_weight(ticket)
    in_use = in_use + weight
    by_rank[rank] = (by_rank[rank] or 0) + weight
    granted[#granted + 1] = ticket
  end
  q_publish(channel, 'g', granted)
end
