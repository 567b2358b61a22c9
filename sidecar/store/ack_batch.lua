-- ack_batch.lua: Stripe accepted (or permanently refused) one planned event.
--
-- KEYS[1]  billing state  tw:{acct}:bill
-- KEYS[2]  usage totals   tw:{acct}:totals ("r|<meter>|<month>" -> units Stripe accepted)
-- KEYS[3]  usage stream   tw:{acct}:usage
-- KEYS[4]  refused events tw:{acct}:bill:failed (a list, for people to look at)
-- ARGV[1]  the event's identifier
-- ARGV[2]  "" when Stripe accepted it, else why it was refused for good
--
-- Returns how many planned events are still pending. Once none are, the
-- stream entries up to the cursor are billed and trimmed.

-- #include shared/usage_stream.lua

local raw = redis.call("HGET", KEYS[1], "pending") or "[]"
local keep = {}
for _, event in ipairs(cjson.decode(raw)) do
  if event.identifier == ARGV[1] then
    if ARGV[2] == "" then
      redis.call("HINCRBY", KEYS[2], billed_field(event.meter, event.month), event.value)  -- a string
    else
      event.error = ARGV[2]
      redis.call("RPUSH", KEYS[4], cjson.encode(event))
    end
  else
    table.insert(keep, event)
  end
end
-- cjson encodes an empty table as {}, not [].
redis.call("HSET", KEYS[1], "pending", #keep == 0 and "[]" or cjson.encode(keep))
if #keep == 0 then
  local cursor = redis.call("HGET", KEYS[1], "cursor")
  if cursor then redis.call("XTRIM", KEYS[3], "MINID", cursor) end
end
return #keep
