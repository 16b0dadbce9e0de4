-- decide.lua: decide a rule's checks on one hash slot, all or nothing.
--
-- KEYS[i]  (i = 1..n) the state of check i: a GCRA bucket (string) or a lease
--          table (sorted set). Keys are distinct and share one hash tag.
-- KEYS[n + k]  the waiting line (queue.lua's `line`) of the k-th lease check:
--          a lease refuses while anyone waits for its key.
-- ARGV[1]  "1": consume if every check admits; "0": dry run, never consume (the
--          backend's report of untouched state after another slot refused).
-- ARGV[4i-2 .. 4i+1]  check i, as checks.lua describes ("t", interval, burst,
--          cost or "l", limit, ttl, lease_id; seconds as doubles).
-- Returns {verdict, admitted_1, remaining_1, retry_after_1, reset_after_1, ...}:
-- verdict and admitted_i are 1 or 0, remaining_i whole units (free slots for a
-- lease; 0 when it refuses), retry_after_i and reset_after_i seconds as '%.17g'
-- strings. When the verdict is 0 nothing is consumed and a check that would have
-- admitted reports the untouched state (no cost taken, no lease added).

local n = (#ARGV - 1) / 4
local C = evaluate(1, n)
local verdict = C.verdict
if verdict and ARGV[1] == '1' then
  for i = 1, n do
    commit(C, i)
  end
else
  for i = 1, n do
    untouched(C, i)
  end
end
return results(C, {verdict and 1 or 0})
