-- enqueue.lua: decide a rule's checks on one hash slot and, if only the queued
-- lease lacks a slot, put the request in that lease's waiting line (queue.lua),
-- all in one step. QueueBackend.enqueue of ratelimit/backends/base.py.
--
-- KEYS[1 .. n]     the checks' state, as decide.lua
-- KEYS[n + k]      the line of the k-th lease check, as decide.lua
-- KEYS[#KEYS - 5 .. #KEYS - 3]  the queued lease's tickets, fair and meta keys
-- KEYS[#KEYS - 2 .. #KEYS]  its book: due, ranks and meta keys (book.lua)
-- ARGV[1]  q: the index of the queued lease check (1-based)
-- ARGV[2]  the channel hand-offs and sheds are published on
-- ARGV[3]  capacity: waiters at most
-- ARGV[4]  the newcomer's class rank (0 first)
-- ARGV[5]  its fair key ("" for plain FIFO)
-- ARGV[6]  max_position: refuse ("too_long") past this place in line (-1: any)
-- ARGV[7]  guaranteed slots, "rank slots rank slots ..." ("" for none)
-- ARGV[8]  the ticket's ttl in seconds (a double): it expires unless wait.lua
--          heart-beats it
-- ARGV[9]  spacing: seconds between appointments (a double; 0: none)
-- ARGV[10 ..]  the checks, 4 per check as decide.lua (from ARGV[10])
-- Returns {outcome, position, length, member, retry_in, results}, results the
-- verdict and per-check results packed as decide.lua's reply: outcome "admitted"
-- (every check admitted and consumed: nobody was waiting and a slot was free),
-- "refused" (another check refused: nothing consumed), "too_long" or "full" (the
-- line would not take it: nothing consumed), or "queued" (every other check
-- consumed; the lease's result reports no free slot; `member` names the ticket in
-- line for wait.lua and leave.lua). position
-- is the place in line (0: next) for queued/too_long/full, else -1; length the
-- line's length after the step. A full line may shed its lowest waiter for the
-- newcomer (queue.victim_index); the shed ticket is published, and free slots
-- are then handed to the head (the newcomer may get one at once).
--
-- Appointments (queue.enqueue with a book): with spacing > 0 and a non-empty fair
-- key, lapsed appointments are pruned; a caller whose appointment is due keeps it
-- and joins the line past capacity and max_position; one that is early, or whose
-- class (or a higher one) has appointments outstanding, is refused "too_long"
-- with its appointment; any "full"/"too_long" refusal gets one (book.lua b_give,
-- the first free at now + (length + 1) * spacing). retry_in is that appointment
-- in seconds from now as a '%.17g' string, "0" for none.

local BASE = 9
local q = tonumber(ARGV[1])
local channel = ARGV[2]
local capacity, rank, fair = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local max_position, g_text, ticket_ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local spacing = tonumber(ARGV[9])
local n = (#ARGV - BASE) / 4
local leases_before_q = 0
for i = 1, q do
  if ARGV[BASE + 4 * i - 3] == 'l' then
    leases_before_q = leases_before_q + 1
  end
end
local Q = {leases = KEYS[q], line = KEYS[n + leases_before_q], tickets = KEYS[#KEYS - 5],
           fair = KEYS[#KEYS - 4], meta = KEYS[#KEYS - 3]}
local B = {due = KEYS[#KEYS - 2], ranks = KEYS[#KEYS - 1], meta = KEYS[#KEYS]}
local ticket = ARGV[BASE + 4 * q]

-- Dead workers' tickets hold no place, and may leave the line empty.
q_drop_expired(Q, channel)

local C = evaluate(BASE, n)
local function answer(outcome, position, length, member, due)
  local retry_in = '0'
  if due and due ~= 0 then
    retry_in = string.format('%.17g', due - now)
  end
  return {outcome, position, length, member, retry_in, results(C)}
end

if C.verdict then
  for i = 1, n do
    commit(C, i)
  end
  return answer('admitted', -1, 0, '')
end
for i = 1, n do
  if i ~= q and not C[i][1] then
    for k = 1, n do
      untouched(C, k)
    end
    return answer('refused', -1, redis.call('ZCARD', Q.line), '')
  end
end

-- Only the queued lease lacks a slot: the queue.enqueue step.
local limit, lease_ttl = ARGV[BASE + 4 * q - 2], ARGV[BASE + 4 * q - 1]
local g = q_guaranteed(g_text)
local length = redis.call('ZCARD', Q.line)
if length > 0 then  -- memory keeps a line's config current on every attempt
  redis.call('HSET', Q.meta, 'limit', limit, 'ttl', lease_ttl, 'g', g_text)
end

local function place()
  local meta = redis.call('HMGET', Q.meta, 'r' .. rank, 'seq')
  local count = tonumber(redis.call('HGET', Q.fair, fair) or '0')
  local sort_key = q_sort_key(rank, tonumber(meta[1] or '0') + count + 1, tonumber(meta[2] or '0') + 1)
  return sort_key
end

local sort_key = place()
local position = redis.call('ZLEXCOUNT', Q.line, '-', '(' .. sort_key)

-- Refuse (nothing consumed); a known caller gets an appointment.
local booking = spacing > 0 and fair ~= ''
local grace = booking and b_grace(spacing) or 0
local function refuse(outcome)
  for k = 1, n do
    untouched(C, k)
  end
  local due = 0
  if booking then
    due = b_give(B, fair, rank, now + (length + 1) * spacing, spacing)
    b_close(B, grace)
  end
  return answer(outcome, position, length, '', due)
end

local kept = false  -- an appointment is kept: past every bound
if booking then
  b_prune(B, grace)
  local held = b_claim(B, fair)
  if held == 0 then
    kept = true
  elseif held > 0 or b_booked_ahead(B, rank) then
    return refuse('too_long')
  end
end

if not kept and position > max_position then
  return refuse('too_long')
end

local in_use = {}
if g then
  in_use = q_in_use_by_rank(Q.leases)  -- evaluate() pruned the dead leases
end
local shed = nil
if not kept and length >= capacity then
  local ahead = redis.call('ZLEXCOUNT', Q.line, '[' .. string.format('%04d', rank), '(' .. sort_key)
  local claimed = q_claims(rank, ahead, in_use, g)
  -- queue.victim_index: the last waiter of the lowest class whose last waiter
  -- has no guarantee claim, ranked below the newcomer unless it has a claim.
  local members = redis.call('ZRANGE', Q.line, 0, -1)
  local ranks, per_class = {}, {}
  for i, member in ipairs(members) do
    ranks[i] = tonumber(string.sub(member, 1, 4))
    per_class[ranks[i]] = (per_class[ranks[i]] or 0) + 1
  end
  for i = #members, 1, -1 do
    local r = ranks[i]
    if not (i < #members and ranks[i + 1] == r)
        and not q_claims(r, per_class[r] - 1, in_use, g)
        and (r > rank or (claimed and r < rank)) then
      shed = members[i]
      break
    end
  end
  if shed == nil then
    return refuse('full')
  end
  q_remove(Q, shed)
end
if booking then
  b_close(B, grace)  -- a kept appointment or pruning may have emptied the book
end

-- Insert (placed again: shedding may have emptied the line and reset its counters).
sort_key = place()
local seq = tonumber(string.sub(sort_key, 15))
local member = sort_key .. '|' .. fair .. '|' .. ticket
local expiry = now + ticket_ttl
redis.call('HSET', Q.meta, 'seq', seq, 'limit', limit, 'ttl', lease_ttl, 'g', g_text)
redis.call('HINCRBY', Q.fair, fair, 1)
redis.call('ZADD', Q.line, 0, member)
redis.call('ZADD', Q.tickets, string.format('%.17g', expiry), member)
q_keep(Q, expiry)
position = redis.call('ZRANK', Q.line, member)
length = redis.call('ZCARD', Q.line)

for i = 1, n do
  if i ~= q then
    commit(C, i)
  end
end
if shed ~= nil then
  local _, _, _, shed_ticket = q_parse(shed)
  q_publish(channel, 's', {shed_ticket})
end
-- A slot may be free (the line was only passing through): serve the head now.
q_hand_off(Q, channel)
return answer('queued', position, length, member)
