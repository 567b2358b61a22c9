-- decide.lua: admit one request for one account, all or nothing.
--
-- KEYS[1]  account hash   tw:{acct}:a   plan, status, grace_until (Unix s)
-- KEYS[2]  token bucket   tw:{acct}:rl  tokens (float), ts (us)
-- KEYS[3]  quota counter  tw:{acct}:q   k (period kind), p (period start, Unix s), used
-- ARGV[1]  now in microseconds, or "" to use Redis TIME (the production clock)
-- ARGV[2]  plan the caller believes the account has (its limits follow)
-- ARGV[3]  rate: tokens refilled per second (float > 0)
-- ARGV[4]  burst: bucket size (integer >= 1)
-- ARGV[5]  cost of this request (integer >= 1)
-- ARGV[6]  quota limit per period (0 = no quota; usage is still counted)
-- ARGV[7]  quota period: hour | day | month (calendar, UTC)
-- ARGV[8]  overage: block | bill
-- ARGV[9]  key expiry in microseconds since the epoch (0 = never)
-- ARGV[10] 1 if ARGV[2]'s plan includes the feature the request needs, else 0
-- ARGV[11] fallback plan for a past_due account whose grace is over ("" = deny)
-- KEYS[4]  usage stream   tw:{acct}:usage  (metered requests: m, q, t, ms, k)
-- KEYS[5]  usage totals   tw:{acct}:totals ("<meter>|<month start>" -> units)
-- KEYS[6]  reservation    tw:{acct}:rsv:<request hash> (untouched without ARGV[13])
-- KEYS[7]  reservations   tw:{acct}:rsvs   (request hash -> settle-by time)
-- KEYS[8]  quota alerts   tw:{acct}:alerts ("<kind>:<period start>:<percent>" sent)
-- ARGV[12] meter for this plan's requests ("" = the plan meters nothing)
-- ARGV[13] request hash to reserve the cost under ("" = no reservation: meter now)
-- ARGV[14] reservation lifetime in seconds
-- ARGV[15] quota percentages that notify, comma separated ("" = none)
-- KEYS[9]  leases         tw:{acct}:leases (lease id -> expiry, Unix s)
-- ARGV[16] concurrency: leases the plan allows at once (0 = unlimited, no lease)
-- ARGV[17] lease id for this request
-- ARGV[18] lease lifetime in seconds
--
-- Returns {code, plan, status, tokens_milli, reset_ms, retry_ms, quota_used, period_end, now_s,
--          thresholds} where thresholds lists the quota percentages this
--          request crossed for the first time this period ("80,100" or "").
--   code 0 ok, 1 no account, 2 plan differs from ARGV[2] (plan = the one to
--   enforce, the fallback after grace; call again with its limits), 3 key
--   expired, 4 subscription inactive, 8 concurrency limited,
--   5 feature not in plan, 6 rate limited, 7 quota exceeded.
--   retry_ms is -1 when waiting can never help (cost above burst or quota).
-- Only code 0 writes anything: a denied request consumes nothing.

local now_us
if ARGV[1] == "" then
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[1])
end
local now_s = math.floor(now_us / 1000000)

local function reply(code, plan, status, tokens, reset_ms, retry_ms, used, period_end, crossed)
  return {code, plan or "", status or "", math.floor(tokens * 1000), math.floor(reset_ms),
          math.floor(retry_ms), used, period_end, now_s, crossed or ""}
end

local key_expires = tonumber(ARGV[9])
if key_expires > 0 and now_us >= key_expires then
  return reply(3, "", "", 0, 0, 0, 0, 0)
end

local acct = redis.call("HMGET", KEYS[1], "plan", "status", "grace_until")
local plan, status, grace_until = acct[1], acct[2], tonumber(acct[3] or "0") or 0
if not plan then
  return reply(1, "", "", 0, 0, 0, 0, 0)
end
local entitled = status == "active" or status == "trialing"
  or (status == "past_due" and now_s < grace_until)
if not entitled and status == "past_due" and ARGV[11] ~= "" then
  plan, entitled = ARGV[11], true
end
if not entitled then
  return reply(4, plan, status, 0, 0, 0, 0, 0)
end
-- "" is never a plan: the caller is asking which plan to enforce.
if ARGV[2] == "" or plan ~= ARGV[2] then
  return reply(2, plan, status, 0, 0, 0, 0, 0)
end
if ARGV[10] ~= "1" then
  return reply(5, plan, status, 0, 0, 0, 0, 0)
end

-- Calendar arithmetic (proleptic Gregorian, UTC), after H. Hinnant's algorithms.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local period = ARGV[7]
local p_start, p_end
local y, m = civil_from_days(math.floor(now_s / 86400))
local month_start = days_from_civil(y, m, 1) * 86400
if period == "hour" then
  p_start = now_s - now_s % 3600
  p_end = p_start + 3600
elseif period == "day" then
  p_start = now_s - now_s % 86400
  p_end = p_start + 86400
else
  p_start = month_start
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  p_end = days_from_civil(y, m, 1) * 86400
end

local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local quota_limit = tonumber(ARGV[6])

local bucket = redis.call("HMGET", KEYS[2], "tokens", "ts")
local tokens = burst
if bucket[1] then
  local elapsed = math.max(0, now_us - tonumber(bucket[2]))
  tokens = math.min(burst, tonumber(bucket[1]) + elapsed * rate / 1000000)
end

-- A counter from another period, or another kind of period (a plan change
-- from monthly to daily quotas), starts over.
local q = redis.call("HMGET", KEYS[3], "k", "p", "used")
local used = 0
if q[1] == period and tonumber(q[2]) == p_start then used = tonumber(q[3]) end

local function full_in_ms(level)
  return (burst - level) * 1000 / rate
end

-- Concurrency: leases past their lifetime free themselves here.
local concurrency = tonumber(ARGV[16])
if concurrency > 0 then
  redis.call("ZREMRANGEBYSCORE", KEYS[9], "-inf", now_s)
  -- A lease id already held is another request in flight under the same id
  -- (a client may choose it): it needs a slot of its own, so it counts as full.
  local held = redis.call("ZSCORE", KEYS[9], ARGV[17])
  if held or redis.call("ZCARD", KEYS[9]) >= concurrency then
    local soonest = redis.call("ZRANGE", KEYS[9], 0, 0, "WITHSCORES")
    local retry = (tonumber(soonest[2]) - now_s) * 1000
    return reply(8, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
  end
end

if quota_limit > 0 and ARGV[8] == "block" and used + cost > quota_limit then
  local retry = (p_end - now_s) * 1000
  if cost > quota_limit or cost > burst then retry = -1 end
  return reply(7, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
end
if tokens < cost then
  local retry = -1
  if cost <= burst then retry = math.ceil((cost - tokens) * 1000 / rate) end
  return reply(6, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
end

tokens = tokens - cost
used = used + cost
if concurrency > 0 then
  local ttl = tonumber(ARGV[18])
  redis.call("ZADD", KEYS[9], now_s + ttl, ARGV[17])
  redis.call("EXPIRE", KEYS[9], ttl + 60)
end
redis.call("HSET", KEYS[2], "tokens", string.format("%.17g", tokens), "ts", now_us)
-- A bucket left alone refills to full; after that its key carries no information.
redis.call("PEXPIRE", KEYS[2], math.ceil(full_in_ms(0)) + 1000)
redis.call("HSET", KEYS[3], "k", period, "p", p_start, "used", used)
redis.call("EXPIRE", KEYS[3], p_end - now_s + 86400)

local meter = ARGV[12]
-- A request id already holding a reservation cannot hold a second one (a client
-- may choose the id): this request is metered now instead.
if ARGV[13] ~= "" and redis.call("EXISTS", KEYS[6]) == 0 then
  -- Reserved: settled by record_usage.lua (the real cost; the quota moves by
  -- the difference) or, if that never comes, expired by expire_reservation.lua
  -- at the estimate. Metered usage is billed by exactly one of the two.
  local settle_by = now_s + tonumber(ARGV[14])
  redis.call("HSET", KEYS[6], "q", cost, "m", meter, "t", now_s, "ms", month_start,
    "kind", period, "p", p_start, "state", "open")
  redis.call("EXPIRE", KEYS[6], tonumber(ARGV[14]) + 7 * 86400)
  redis.call("ZADD", KEYS[7], settle_by, ARGV[13])
elseif meter ~= "" then
  redis.call("XADD", KEYS[4], "*", "m", meter, "q", cost, "t", now_s, "ms", month_start, "k", "")
  redis.call("HINCRBY", KEYS[5], meter .. "|" .. month_start, cost)
end

local crossed = {}
if quota_limit > 0 and ARGV[15] ~= "" then
  for pct in string.gmatch(ARGV[15], "%d+") do
    local mark = quota_limit * tonumber(pct) / 100
    if used - cost < mark and used >= mark then
      if redis.call("HSETNX", KEYS[8], period .. ":" .. p_start .. ":" .. pct, now_s) == 1 then
        table.insert(crossed, pct)
      end
    end
  end
  if #crossed > 0 then redis.call("EXPIRE", KEYS[8], p_end - now_s + 86400) end
end
return reply(0, plan, status, tokens, full_in_ms(tokens), 0, used, p_end, table.concat(crossed, ","))
