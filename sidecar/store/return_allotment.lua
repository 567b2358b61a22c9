-- return_allotment.lua: a sidecar hands an allotment back (admit.lua's header
-- says how one is granted): what it did not use goes back to the bucket and the
-- quota, what it admitted from it is recorded as usage. Each allotment once.
--
-- KEYS[1]  limits      tw:{acct}:rl      tokens, ts, k, p, used, h (held), hx
-- KEYS[2]  allotments  tw:{acct}:al      id -> "units|period start|lapses at", or
--                                        "-units|period start|forgotten at" once lapsed
-- KEYS[3]  usage       tw:{acct}:usage   usage stream (fields: shared/usage_stream.lua)
-- KEYS[4]  totals      tw:{acct}:totals
-- KEYS[5]  credits     tw:{acct}:cr      prepaid balance; al:<id> the grants that
--                                        paid for the allotment (admit.lua)
-- KEYS[6]  ledger      tw:{acct}:crl     its ledger stream
--
-- ARGV[1]  now_us      now in microseconds, or "" to use Redis TIME (production)
-- ARGV[2]  id          the allotment's id
-- ARGV[3]  used        units the sidecar admitted from it
-- ARGV[4]  rate        the plan's refill per second (the bucket is brought up to now)
-- ARGV[5]  burst       its bucket size
-- ARGV[6]  meter       meter for the plan's requests ("" = it meters nothing)
-- ARGV[7]  at          when the allotment was granted (Unix s): the usage's time
-- ARGV[8]  month       that time's month start (Unix s), the totals' period
-- ARGV[9]  kind        the plan's quota period (hour | day | month) when it was granted
-- ARGV[10] credits     "1" when the plan burns credits: the unused units are refunded
--
-- Returns {state, units given back to the bucket}: state "returned" (the unused
-- units went back to the bucket and the quota), "lapsed" (held past its time: the
-- bucket has refilled those units already, so only the quota gets the unused
-- ones back) or "unknown" (returned already, or forgotten an hour after lapsing:
-- nothing happens). Usage is recorded for "returned" and "lapsed" only, so a
-- retried return bills once; so is a refund of credits (to the grants that paid,
-- last taken first: shared/credits.lua), whether it returned in time or lapsed.

-- #include shared/bucket.lua
-- #include shared/usage_stream.lua
-- #include shared/credits.lua

local now_us = clock_us(ARGV[1])
local id, used, rate, burst = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

local entry = redis.call("HGET", KEYS[2], id)
local lapsed, units, period = string.match(entry or "", "^(%-?)(%d+)|(%d+)|%d+$")
if not units then
  -- (what paid for one forgotten after lapsing stays paid: only the note goes)
  if ARGV[10] == "1" then redis.call("HDEL", KEYS[5], "al:" .. id) end
  return {"unknown", 0}
end
redis.call("HDEL", KEYS[2], id)
units = tonumber(units)
used = math.min(used, units)
local unused = units - used

local s = redis.call("HMGET", KEYS[1], "tokens", "ts", "k", "p", "used", "h")
local fields = {}
local given = 0
if lapsed == "" then
  -- The bucket is brought up to now under the cap that held until now (its units
  -- were out: refill past that cap was never the bucket's), then takes the unused
  -- units back: its level and the units still held sum to burst at most.
  local was_held = tonumber(s[6] or "0") or 0
  local tokens = refilled(s[1], s[2], now_us, rate, math.max(0, burst - was_held))
  local held = math.max(0, was_held - units)
  local level = math.min(math.max(0, burst - held), tokens + unused)
  given = level - tokens
  fields = {"tokens", string.format("%.17g", level), "ts", now_us, "h", held}
  if held == 0 then table.insert(fields, "hx"); table.insert(fields, 0) end
end
-- The quota takes back what was not used, while the allotment's period runs (the
-- same kind of period: a day may start when its month does).
if unused > 0 and s[5] and s[3] == ARGV[9] and tonumber(s[4]) == tonumber(period) then
  table.insert(fields, "used"); table.insert(fields, math.max(0, tonumber(s[5]) - unused))
end
if #fields > 0 then redis.call("HSET", KEYS[1], unpack(fields)) end
if ARGV[10] == "1" then
  local paid = redis.call("HGET", KEYS[5], "al:" .. id)
  if paid then
    local cr = credits_lib()
    local c = cr.load(KEYS[5])
    local now_s = math.floor(now_us / 1000000)
    cr.sweep(c, KEYS[6], now_s)
    if unused > 0 then cr.refund(c, KEYS[6], now_s, unused, paid) end
    c.del["al:" .. id] = true
    cr.save(c)
  end
end
if ARGV[6] ~= "" and used > 0 then
  count_usage(KEYS[3], KEYS[4], ARGV[6], used, ARGV[7], ARGV[8], "allotment:" .. id)
end
local state = "returned"
if lapsed == "-" then state = "lapsed" end
return {state, math.floor(given)}
