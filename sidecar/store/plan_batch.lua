-- plan_batch.lua: fix the next Stripe meter events for an account before any
-- is sent, so a retry after a crash sends the very same events.
--
-- KEYS[1]  usage stream   tw:{acct}:usage
-- KEYS[2]  billing state  tw:{acct}:bill   cursor (last planned entry), pending (JSON)
-- ARGV[1]  customer id (part of each event's identity)
-- ARGV[2]  most entries to plan at once
--
-- Returns the pending events as JSON: a list of
--   {identifier, meter, value (a decimal string), timestamp, month}
-- one per (meter, minute) of usage. Pending events are returned unchanged
-- until each is acknowledged (ack_batch.lua); only then is more planned.
-- identifier is a hash of customer, meter, minute and first entry id: the
-- same usage always yields the same identifier, which Stripe deduplicates.

-- #include shared/usage_stream.lua

local pending = redis.call("HGET", KEYS[2], "pending")
if pending and pending ~= "[]" then
  return pending
end
local cursor = redis.call("HGET", KEYS[2], "cursor") or "0-0"
local entries = redis.call("XRANGE", KEYS[1], "(" .. cursor, "+", "COUNT", tonumber(ARGV[2]))
if #entries == 0 then
  return "[]"
end
local groups, order = {}, {}
for _, entry in ipairs(entries) do
  local usage = usage_fields(entry[2])
  local minute = math.floor(usage.at / 60) * 60
  local group = usage.meter .. "|" .. minute
  if not groups[group] then
    groups[group] = {meter = usage.meter, timestamp = minute, value = 0, first = entry[1],
      month = usage.month}
    table.insert(order, group)
  end
  groups[group].value = groups[group].value + usage.quantity
end
local batch = {}
for _, group in ipairs(order) do
  local g = groups[group]
  table.insert(batch, {
    identifier = "tw_" .. redis.sha1hex(ARGV[1] .. "|" .. g.meter .. "|" .. g.timestamp .. "|" .. g.first),
    -- value as a decimal string: cjson writes numbers with 14 significant
    -- digits, and a bill must be exact to the unit.
    meter = g.meter, value = string.format("%d", g.value), timestamp = g.timestamp,
    month = tonumber(g.month)})
end
local encoded = cjson.encode(batch)
redis.call("HSET", KEYS[2], "pending", encoded, "cursor", entries[#entries][1])
return encoded
