-- decide.lua: decide a rule's checks on one hash slot, all or nothing.
--
-- KEYS[i]  (i = 1..n) the state of check i: a GCRA bucket (string) or a lease
--          table (sorted set). Keys are distinct and share one hash tag.
-- KEYS[n + k]  the waiting line (queue.lua's `line`) of the k-th lease check:
--          a lease refuses while anyone waits for its key.
-- ARGV[1]  "1": consume if every check admits; "0": dry run, never consume (the
--          backend's report of untouched state after another slot refused).
-- ARGV[4i-2 .. 4i+1]  check i, as checks.lua describes ("t", interval, burst,
--          cost; "l", limit, ttl, lease_id; or "f"/"s"/"m", limit, period, cost;
--          seconds as doubles).
-- Returns results() of checks.lua: one string of little-endian doubles, the
-- verdict then {admitted_i, remaining_i, retry_after_i, reset_after_i} per check:
-- verdict and admitted_i 1 or 0, remaining_i whole units (free slots for a lease;
-- 0 when it refuses), retry_after_i and reset_after_i seconds. When the verdict is
-- 0 nothing is consumed and a check that would have admitted reports the untouched
-- state (no cost taken, no lease added). When a window check took units, the
-- reply ends with one more double: the server time they were taken at.

local n = (#ARGV - 1) / 4

-- The common rule, one bucket, without the per-check tables of evaluate(): the
-- same steps as evaluate(), commit() and untouched() for that one check.
if n == 1 and ARGV[2] == 't' then
  local interval, burst, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local tat = read_tat(KEYS[1])
  local t = now_usec / 1000000
  local ok, new_tat, remaining, retry, reset = gcra(tat, t, cost, interval, burst)
  if ok and ARGV[1] == '1' then
    if cost > 0 then
      write_tat(KEYS[1], new_tat, reset)
    end
  elseif ok then
    local _
    _, _, remaining, _, reset = gcra(tat, t, 0, interval, burst)
  end
  local admitted = ok and 1 or 0
  return struct.pack('<ddddd', admitted, admitted, remaining, retry, reset)
end

local C = evaluate(1, n)
if C.verdict and ARGV[1] == '1' then
  for i = 1, n do
    commit(C, i)
  end
else
  for i = 1, n do
    untouched(C, i)
  end
end
return results(C)
