-- book.lua: appointments, the steps of ratelimit/algorithms/queue.py `Book`, shared
-- by the scripts that touch one (enqueue, appoint; prepended after the clock
-- prelude, see scripts.py). Tests hold them to the pure Book on the same inputs.
--
-- A book lives in three keys sharing its lease table's hash tag (keyspace.py),
-- passed to each script as a table B = {due, ranks, meta}:
--   due    sorted set: fair key -> the time its appointment is due, seconds since
--          the epoch (server time) as a double
--   ranks  hash: fair key -> the class rank of its appointment
--   meta   hash: 'c<rank>' -> appointments of that class outstanding (absent at
--          zero), 'l<rank>' -> the due time of the class's latest appointment
-- The three are deleted together when the book is empty (a fresh Book: no class
-- has a `last`), and kept alive BOOK_MARGIN_MS past the latest due time plus its
-- grace, so a fleet that died leaves nothing behind. A key that outlived the
-- others is harmless: every step prunes first, and an empty `due` clears the rest.
-- Times are compared exactly as the pure code compares them (doubles).

local BOOK_MAX = 10000
local BOOK_MARGIN_MS = 1000

-- queue.grace_for: seconds an appointment stays claimable after its time.
local function b_grace(spacing)
  return math.max(2.0, 4 * spacing)
end

local function b_drop(B, fair)
  local rank = redis.call('HGET', B.ranks, fair)
  redis.call('ZREM', B.due, fair)
  redis.call('HDEL', B.ranks, fair)
  if rank and redis.call('HINCRBY', B.meta, 'c' .. rank, -1) <= 0 then
    redis.call('HDEL', B.meta, 'c' .. rank)
  end
end

-- Book.prune: drop appointments not kept within `grace` of their time; an emptied
-- book forgets its classes' last times.
local function b_prune(B, grace)
  -- Candidates by score, with a margin for rounding; the exact test decides.
  local bound = string.format('%.17g', now - grace + 0.001)
  local old = redis.call('ZRANGEBYSCORE', B.due, '-inf', bound, 'WITHSCORES')
  for i = 1, #old, 2 do
    if tonumber(old[i + 1]) + grace < now then
      b_drop(B, old[i])
    end
  end
  if redis.call('EXISTS', B.due) == 0 then
    redis.call('DEL', B.ranks, B.meta)
  end
end

-- Book.booked_ahead: whether appointments of this class or a higher one are outstanding.
local function b_booked_ahead(B, rank)
  local fields = redis.call('HGETALL', B.meta)
  for i = 1, #fields, 2 do
    local r = string.match(fields[i], '^c(%d+)$')
    if r and tonumber(r) <= rank and tonumber(fields[i + 1]) > 0 then
      return true
    end
  end
  return false
end

-- Book.give: the caller's appointment (its outstanding one if still ahead, else the
-- next free one of its class, at least `first_free` and one `spacing` after the
-- class's last); 0 when the book is full.
local function b_give(B, fair, rank, first_free, spacing)
  local held = redis.call('ZSCORE', B.due, fair)
  if held then
    held = tonumber(held)
    if held > now then
      return held
    end
    b_drop(B, fair)
  end
  if redis.call('ZCARD', B.due) >= BOOK_MAX then
    return 0
  end
  local last = tonumber(redis.call('HGET', B.meta, 'l' .. rank) or '0')
  local due = math.max(first_free, last + spacing)
  local text = string.format('%.17g', due)
  redis.call('ZADD', B.due, text, fair)
  redis.call('HSET', B.ranks, fair, rank)
  redis.call('HINCRBY', B.meta, 'c' .. rank, 1)
  redis.call('HSET', B.meta, 'l' .. rank, text)
  return due
end

-- Book.claim: keep a due appointment (0, removed), or say when it is due (still
-- booked); -1 when the caller has none.
local function b_claim(B, fair)
  local held = redis.call('ZSCORE', B.due, fair)
  if not held then
    return -1
  end
  held = tonumber(held)
  if held <= now then
    b_drop(B, fair)
    return 0
  end
  return held
end

-- After a step: an empty book goes; a live one lives until its latest appointment
-- has lapsed (plus a margin).
local function b_close(B, grace)
  local top = redis.call('ZRANGE', B.due, -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', B.ranks, B.meta)
    return
  end
  local ms = math.ceil((tonumber(top[2]) + grace - now) * 1000) + BOOK_MARGIN_MS
  keep_alive(B.due, ms)
  keep_alive(B.ranks, ms)
  keep_alive(B.meta, ms)
end
