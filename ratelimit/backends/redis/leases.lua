-- leases.lua: the weight of a lease, shared by the scripts that count slots
-- (decide, enqueue, in_use and the line scripts; prepended after the clock
-- prelude, see scripts.py). ratelimit/algorithms/leases.py `weight_of`/`held`.
--
-- A lease of a weighted pool holds w slots and its id ends with "*<w>"; an id
-- without the mark holds one. Every lease of one pool is marked or none is, so
-- an unweighted pool is still counted by ZCARD.

-- leases.weight_of: slots lease `id` holds.
local function l_weight(id)
  local w = string.match(id, '%*(%d+)$')
  if w then
    return tonumber(w)
  end
  return 1
end

-- Whether `text` (a lease id or a line member) names a weighted pool's lease.
local function l_marked(text)
  return string.find(text, '*', 1, true) ~= nil
end

-- leases.held: slots held by every lease in table `key` (the caller pruned dead ones).
local function l_held(key)
  local total = 0
  for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + l_weight(id)
  end
  return total
end
