-- expire_reservation.lua: bill an unsettled reservation at its estimate.
--
-- KEYS[1]  reservation   tw:{acct}:rsv:<request hash>
-- KEYS[2]  reservations  tw:{acct}:rsvs
-- KEYS[3]  usage stream  tw:{acct}:usage
-- KEYS[4]  usage totals  tw:{acct}:totals
-- ARGV[1]  the request hash (member of KEYS[2])
--
-- Returns units billed (0 if it was settled meanwhile or is not due yet).

-- #include shared/usage_stream.lua

local t = redis.call("TIME")
local now = tonumber(t[1])
local due = redis.call("ZSCORE", KEYS[2], ARGV[1])
if not due or tonumber(due) > now then
  return 0
end
redis.call("ZREM", KEYS[2], ARGV[1])
local r = redis.call("HMGET", KEYS[1], "q", "m", "t", "ms", "state")
if not r[1] or r[5] ~= "open" then
  return 0
end
redis.call("HSET", KEYS[1], "state", "expired")
if r[2] == "" then
  return 0  -- the plan meters nothing: the estimate stays on the quota, unbilled
end
count_usage(KEYS[3], KEYS[4], r[2], tonumber(r[1]), r[3], r[4], "")
return tonumber(r[1])
