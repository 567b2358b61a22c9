-- admit.lua: admit one request for one account, all or nothing.
--
-- KEYS[1]  account       tw:{acct}:a       plan, status, grace_until (Unix s)
-- KEYS[2]  limits        tw:{acct}:rl      tokens (float), ts (us), k (period kind),
--                                           p (period start, Unix s), used, x (expires at),
--                                           h (units held in allotments), hx (when the
--                                           next of them lapses, Unix s), ax (when
--                                           KEYS[13] expires, Unix s)
-- KEYS[3]  legacy_quota  tw:{acct}:q       the quota counter of releases before 0.2:
--                                           read once if KEYS[2] has none, then deleted
-- KEYS[4]  usage         tw:{acct}:usage   usage stream (metered requests)
-- KEYS[5]  totals        tw:{acct}:totals  "<meter>|<month start>" -> units
-- KEYS[6]  reservation   tw:{acct}:rsv:<request hash> (untouched without a reservation)
-- KEYS[7]  reservations  tw:{acct}:rsvs    request hash -> settle-by time
-- KEYS[8]  alerts        tw:{acct}:alerts  "<kind>:<period start>:<percent>" sent
-- KEYS[9]  leases        tw:{acct}:leases  lease id -> expiry (Unix s)
-- KEYS[10] credits       tw:{acct}:cr      prepaid balance (shared/credits.lua), and
--                                           al:<allotment id> -> the grants that paid
--                                           for it (for the refund its return makes)
-- KEYS[11] ledger        tw:{acct}:crl     its ledger stream
-- KEYS[12] key_limits    tw:{acct}:kl:<key id>  the key's own bucket (tokens, ts),
--                                           quota counter (k, p, used), uses left (n);
--                                           untouched for a key without limits
-- KEYS[13] allotments    tw:{acct}:al      allotment id -> "units|period start|lapses at"
--                                           (held by a sidecar), or "-units|period start|
--                                           forgotten at" (lapsed before its return came:
--                                           a return still bills it, for an hour)
--
-- ARGV[1]  now_us           now in microseconds, or "" to use Redis TIME (production)
-- ARGV[2]  expected_plan    plan the caller believes the account has (its limits follow)
-- ARGV[3]  rate             tokens refilled per second (float > 0)
-- ARGV[4]  burst            bucket size (integer >= 1)
-- ARGV[5]  quota_limit      quota per period (0 = no quota; usage is still counted)
-- ARGV[6]  quota_period     hour | day | month (calendar, UTC)
-- ARGV[7]  period_start     the caller's start of the current period (Unix s): used when
--                           Redis TIME falls inside it, else computed here
-- ARGV[8]  period_end       its end (Unix s)
-- ARGV[9]  month_start      the current month's start (Unix s), the totals' period
-- ARGV[10] overage          block | bill
-- ARGV[11] meter            meter for this plan's requests ("" = the plan meters nothing)
-- ARGV[12] concurrency      leases the plan allows at once (0 = unlimited, no lease)
-- ARGV[13] lease_ttl        lease lifetime in seconds
-- ARGV[14] fallback_plan    plan for a past_due account whose grace is over ("" = deny)
-- ARGV[15] cost             cost of this request (integer >= 1)
-- ARGV[16] feature_ok       1 if the plan includes the feature the request needs, else 0
-- ARGV[17] key_expires_us   key expiry in microseconds since the epoch (0 = never)
-- ARGV[18] reservation      request hash to reserve the cost under ("" = meter now)
-- ARGV[19] reservation_ttl  reservation lifetime in seconds
-- ARGV[20] thresholds       quota percentages that notify, comma separated ("" = none)
-- ARGV[21] lease_id         lease id for this request
-- ARGV[22] credits          "" (the plan burns no credits), or what a request the
--                           balance cannot cover gets: block | bill (metered to
--                           ARGV[11]) | plan (code 2 naming ARGV[23])
-- ARGV[23] credits_fallback the plan enforced while the balance is short (mode plan)
-- ARGV[24] credits_parent   set when ARGV[2] is that fallback of this plan: enforce
--                           ARGV[2] only while this plan's balance is still short
-- ARGV[25] low_balance      balances that notify when reached, comma separated
-- ARGV[26] top_up_at        the auto top-up mark for accounts without their own ("" = off)
-- ARGV[27] key_rate         the key's own refill per second (0 = none)
-- ARGV[28] key_burst        its bucket size
-- ARGV[29] key_quota        the key's own quota per period (0 = none)
-- ARGV[30] key_period       hour | day | month
-- ARGV[31] key_uses         requests the key answers in all (0 = no limit)
-- ARGV[32] allot_id         id of the allotment to grant on admission ("" = none)
-- ARGV[33] allot_units      units wanted in it, besides this request's cost (0 = none)
-- ARGV[34] allot_ttl        seconds its units are held for the sidecar; then they lapse
-- ARGV[35] shadow           the plan's limits in shadow mode, comma separated (rate,
--                           quota, concurrency; "" = none): decided and counted as
--                           usual, but what they would deny is admitted
--
-- Allotments (leased enforcement): an admission may also take units from the
-- bucket and the quota for the asking sidecar to admit later requests with,
-- in-process; return_allotment.lua gives back what it did not use. While units
-- are held the bucket refills only up to burst - held, so the bucket's level and
-- the units held never exceed burst together, and over every interval what is
-- admitted, here or from allotments, stays within rate x t + burst. Held units
-- whose return never comes (a crashed sidecar) lapse after allot_ttl: the bucket
-- may refill them; the quota keeps them (they may have been used). On a plan
-- with credits an allotment is paid for from the balance when granted (never
-- beyond it), and its return refunds the units it did not use; a crashed
-- sidecar's stay paid, as the quota keeps them.
--
-- Returns {code, plan, status, tokens_milli, reset_ms, retry_ms, quota_used,
--          period_end, now_s, thresholds, balance, low, top_up, allotted, held,
--          shadow};
--          thresholds lists the quota percentages this request crossed for the first
--          time this period
--          ("80,100" or ""); balance is the credit balance after it ("" for a plan
--          without credits); low the low_balance marks it reached ("" for none);
--          top_up the id of the fall past the top-up mark it made ("" for none);
--          allotted the units granted in allotment ARGV[32] (0 for none); held the
--          units all sidecars hold in allotments (0 when the reply comes before the
--          bucket is read): they may come back to the bucket and the quota; shadow
--          the code (6, 7 or 8) a limit in shadow mode would have denied this
--          admission with (0: none).
--   code 0 ok
--        1 no account
--        2 plan differs from ARGV[2] (plan = the one to enforce, the fallback
--          after grace; call again with its limits)
--        3 key expired
--        4 subscription inactive
--        5 feature not in plan
--        6 rate limited
--        7 quota exceeded
--        8 concurrency limited
--        9 credits exhausted (the balance cannot cover the cost)
--       10 the key's uses are spent
--       11 the key's own bucket is empty (tokens, reset and retry are the key's)
--       12 the key's own quota is spent (used and period_end are the key's)
--   retry_ms is -1 when waiting can never help (cost above burst or quota).
-- Only code 0 consumes anything: a denied request consumes nothing (a grant
-- found past its expiry lapses, on the ledger, whatever the outcome).

-- #include shared/bucket.lua
-- #include shared/usage_stream.lua
-- #include shared/credits.lua

local now_us, expected_plan, rate, burst, quota_limit, quota_period, period_start, period_end,
  month_start, overage, meter, concurrency, lease_ttl, fallback_plan, cost, feature_ok,
  key_expires_us, reservation, reservation_ttl, thresholds, lease_id, credits,
  credits_fallback, credits_parent, low_balance, top_up_at, key_rate, key_burst, key_quota,
  key_period, key_uses, allot_id, allot_units, allot_ttl, shadow = unpack(ARGV)

now_us = clock_us(now_us)
local now_s = math.floor(now_us / 1000000)
rate, burst, quota_limit = tonumber(rate), tonumber(burst), tonumber(quota_limit)
concurrency, cost, key_expires_us = tonumber(concurrency), tonumber(cost), tonumber(key_expires_us)

local balance, low, top_up, allotted, held, would = "", "", "", 0, 0, 0
local function reply(code, plan, status, tokens, reset_ms, retry_ms, used, period_end, crossed)
  return {code, plan or "", status or "", math.floor(tokens * 1000), math.floor(reset_ms),
          math.floor(retry_ms), used, period_end, now_s, crossed or "", balance, low, top_up,
          allotted, held, would}
end

-- The account's balance, with lapsed grants swept (written whatever the outcome).
-- shared/credits.lua's functions are made only for a request that touches a balance.
local cr
local function load_credits()
  cr = cr or credits_lib()
  local c = cr.load(KEYS[10])
  cr.sweep(c, KEYS[11], now_s)
  return c, cr.balance(c)
end

if key_expires_us > 0 and now_us >= key_expires_us then
  return reply(3, "", "", 0, 0, 0, 0, 0)
end

local acct = redis.call("HMGET", KEYS[1], "plan", "status", "grace_until")
local plan, status, grace_until = acct[1], acct[2], tonumber(acct[3] or "0") or 0
if not plan then
  return reply(1, "", "", 0, 0, 0, 0, 0)
end
local entitled = status == "active" or status == "trialing"
  or (status == "past_due" and now_s < grace_until)
if not entitled and status == "past_due" and fallback_plan ~= "" then
  plan, entitled = fallback_plan, true
end
if not entitled then
  return reply(4, plan, status, 0, 0, 0, 0, 0)
end
-- "" is never a plan: the caller is asking which plan to enforce.
if expected_plan ~= "" and plan ~= expected_plan and credits_parent == plan then
  -- The caller enforces this plan's credits fallback: only while the balance is short.
  local c, b = load_credits()
  if b < cost then top_up = cr.due_again(c, now_us) end
  cr.save(c)
  if b >= cost then
    balance = b
    return reply(2, plan, status, 0, 0, 0, 0, 0)
  end
  plan = expected_plan
end
if expected_plan == "" or plan ~= expected_plan then
  return reply(2, plan, status, 0, 0, 0, 0, 0)
end
if feature_ok ~= "1" then
  return reply(5, plan, status, 0, 0, 0, 0, 0)
end

local p_start, p_end = tonumber(period_start), tonumber(period_end)
month_start = tonumber(month_start)
-- The period of `kind` holding now, and the month's start. Calendar arithmetic
-- (proleptic Gregorian, UTC), after H. Hinnant's algorithms; its helpers are made
-- inside, so a request that needs no calendar (most: the caller sends its period)
-- pays for one closure, not three.
local function period_of(kind)
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
  local y, m = civil_from_days(math.floor(now_s / 86400))
  local month = days_from_civil(y, m, 1) * 86400
  if kind == "hour" then
    local s = now_s - now_s % 3600
    return s, s + 3600, month
  elseif kind == "day" then
    local s = now_s - now_s % 86400
    return s, s + 86400, month
  end
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return month, days_from_civil(y, m, 1) * 86400, month
end

if not (p_start <= now_s and now_s < p_end and month_start <= p_start) then
  -- The caller's clock put the request in another period than Redis TIME does
  -- (a boundary, or skew): Redis's clock decides.
  p_start, p_end, month_start = period_of(quota_period)
end

-- The bucket and the period's counter share one hash: one read, one write.
local state = redis.call("HMGET", KEYS[2], "tokens", "ts", "k", "p", "used", "x", "h", "hx",
  "ax")
-- Units held in allotments, once those past their time have lapsed (a sweep
-- recounts them from KEYS[13], so a sweep a denial does not save is only redone).
held = tonumber(state[7] or "0") or 0
local held_until = tonumber(state[8] or "0") or 0
-- The bucket is brought up to now under the cap that held until now (refill past
-- it was never the bucket's), before a sweep frees what lapsed.
local tokens = refilled(state[1], state[2], now_us, rate, math.max(0, burst - held))
local swept = false
if held_until > 0 and held_until <= now_s then
  held, held_until, swept = 0, 0, true
  local all = redis.call("HGETALL", KEYS[13])
  for i = 1, #all, 2 do
    local lapsed, units, p, at = string.match(all[i + 1], "^(%-?)(%d+)|(%d+)|(%d+)$")
    at = tonumber(at)
    if at == nil or (lapsed == "-" and at <= now_s) then
      -- A lapsed allotment whose return never came: what it paid for stays paid.
      redis.call("HDEL", KEYS[13], all[i])
      redis.call("HDEL", KEYS[10], "al:" .. all[i])
    elseif at <= now_s then
      -- Lapsed: its units are free for the bucket; kept an hour, so a late return
      -- still bills what was admitted from it (and gives back the quota left).
      redis.call("HSET", KEYS[13], all[i], "-" .. units .. "|" .. p .. "|" .. (now_s + 3600))
      if held_until == 0 or now_s + 3600 < held_until then held_until = now_s + 3600 end
    else
      if lapsed == "" then held = held + tonumber(units) end
      if held_until == 0 or at < held_until then held_until = at end
    end
  end
end
local legacy = false
if not state[3] then
  -- Written by a release that kept the counter in its own key: read it once.
  local q = redis.call("HMGET", KEYS[3], "k", "p", "used")
  if q[1] then
    state[3], state[4], state[5], legacy = q[1], q[2], q[3], true
  end
end

-- A counter from another period, or another kind of period (a plan change
-- from monthly to daily quotas), starts over.
local same_period = state[3] == quota_period and tonumber(state[4]) == p_start
local used = 0
if same_period then used = tonumber(state[5]) end

local function full_in_ms(level)
  return (burst - level) * 1000 / rate
end

-- Shadow mode (a plan rolling out new limits): a shadowed limit that would deny
-- admits instead, counted as usual (the quota past its limit, the bucket at
-- empty, a lease beyond the limit); the reply names what it would have denied.
local shadowed = {}
if shadow ~= "" then
  for limit in string.gmatch(shadow, "[^,]+") do shadowed[limit] = true end
end

-- Concurrency: leases past their lifetime free themselves here.
if concurrency > 0 then
  redis.call("ZREMRANGEBYSCORE", KEYS[9], "-inf", now_s)
  -- A lease id already held is another request in flight under the same id
  -- (a client may choose it): it needs a slot of its own, so it counts as full.
  local in_use = redis.call("ZSCORE", KEYS[9], lease_id)
  if in_use or redis.call("ZCARD", KEYS[9]) >= concurrency then
    if shadowed.concurrency then
      would = 8
    else
      local soonest = redis.call("ZRANGE", KEYS[9], 0, 0, "WITHSCORES")
      local retry = (tonumber(soonest[2]) - now_s) * 1000
      return reply(8, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
    end
  end
end

local over_quota = quota_limit > 0 and overage == "block" and used + cost > quota_limit
if over_quota and shadowed.quota then
  if would == 0 then would = 7 end
elseif over_quota then
  local retry = (p_end - now_s) * 1000
  -- Units held in allotments come back within a second, unused ones to the quota.
  if held > 0 then retry = math.min(retry, 1000) end
  if cost > quota_limit or cost > burst then retry = -1 end
  return reply(7, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
end
if tokens < cost and shadowed.rate then
  if would == 0 then would = 6 end
elseif tokens < cost then
  local retry = -1
  if cost <= burst then retry = math.ceil((cost - tokens) * 1000 / rate) end
  return reply(6, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
end

-- The key's own limits, on top of the account's: both must pass.
key_rate, key_burst, key_quota = tonumber(key_rate), tonumber(key_burst), tonumber(key_quota)
key_uses = tonumber(key_uses)
local key_limited = key_rate > 0 or key_quota > 0 or key_uses > 0
local kfields = {}
if key_limited then
  local ks = redis.call("HMGET", KEYS[12], "tokens", "ts", "k", "p", "used", "n")
  if key_uses > 0 then
    local left = tonumber(ks[6] or key_uses)
    if left < 1 then
      return reply(10, plan, status, tokens, full_in_ms(tokens), -1, used, p_end)
    end
    table.insert(kfields, "n"); table.insert(kfields, left - 1)
  end
  if key_rate > 0 then
    local kt = refilled(ks[1], ks[2], now_us, key_rate, key_burst)
    local k_full = (key_burst - kt) * 1000 / key_rate
    if kt < cost then
      local retry = -1
      if cost <= key_burst then retry = math.ceil((cost - kt) * 1000 / key_rate) end
      return reply(11, plan, status, kt, k_full, retry, used, p_end)
    end
    table.insert(kfields, "tokens"); table.insert(kfields, string.format("%.17g", kt - cost))
    table.insert(kfields, "ts"); table.insert(kfields, now_us)
  end
  if key_quota > 0 then
    local ks_start, ks_end = period_of(key_period)
    local kused = 0
    if ks[3] == key_period and tonumber(ks[4]) == ks_start then kused = tonumber(ks[5]) end
    if kused + cost > key_quota then
      local retry = (ks_end - now_s) * 1000
      if cost > key_quota then retry = -1 end
      return reply(12, plan, status, tokens, full_in_ms(tokens), retry, kused, ks_end)
    end
    table.insert(kfields, "k"); table.insert(kfields, key_period)
    table.insert(kfields, "p"); table.insert(kfields, ks_start)
    table.insert(kfields, "used"); table.insert(kfields, kused + cost)
  end
end

-- An allotment for the asking sidecar: what the bucket and the quota can spare
-- beyond this request, up to what it asked for. Never for a key with limits of its
-- own (each of its requests is decided here, against them).
local used_before = used
allot_units = tonumber(allot_units)
local grant = 0
if allot_id ~= "" and allot_units > 0 and not key_limited and would == 0 then
  local room = math.floor(tokens - cost)
  if quota_limit > 0 and overage == "block" then
    room = math.min(room, quota_limit - used - cost)
  end
  grant = math.max(0, math.min(allot_units, room))
end

-- Prepaid credits: the balance must cover the cost, else the plan decides. An
-- allotment is paid in advance too, from what the balance holds beyond this
-- request (none when it holds no more); its return refunds what it did not use.
local taken = nil
if credits ~= "" then
  local c, b = load_credits()
  balance = b
  if b < cost and credits ~= "plan" then
    top_up = cr.due_again(c, now_us)  -- nothing burns: a due top-up whose report was lost goes again
  end
  if b < cost and credits ~= "bill" then
    cr.save(c)
    if credits == "plan" then
      return reply(2, credits_fallback, status, 0, 0, 0, 0, 0)
    end
    -- Credits paid for allotments and not used come back within a second.
    local retry = -1
    if held > 0 then retry = 1000 end
    return reply(9, plan, status, tokens, full_in_ms(tokens), retry, used, p_end)
  end
  if b >= cost then
    taken = cr.burn(c, KEYS[11], now_s, cost)
    grant = math.min(grant, math.max(0, math.floor(b - cost)))
    if grant > 0 then
      c.set["al:" .. allot_id] = cr.burn(c, KEYS[11], now_s, grant)
    end
    balance = cr.balance(c)
    low = cr.low(c, b, balance, low_balance)
    top_up = cr.top_up(c, b, balance, top_up_at, now_us)
    meter = ""  -- paid in advance: nothing to bill
  else
    grant = 0  -- billed, not paid: each request is decided here
  end
  cr.save(c)
end
allotted = grant
tokens = math.max(0, tokens - cost - allotted)  -- (0: a shadowed rate limit passed)
used = used + cost + allotted
if #kfields > 0 then
  redis.call("HSET", KEYS[12], unpack(kfields))
  -- Uses left are kept for good; a bucket or a quota only as long as it means something.
  if key_uses == 0 then
    local refill = 0
    if key_rate > 0 then refill = math.ceil(key_burst / key_rate) end
    redis.call("EXPIRE", KEYS[12], 35 * 86400 + refill)
  end
end
if concurrency > 0 then
  redis.call("ZADD", KEYS[9], now_s + tonumber(lease_ttl), lease_id)
  redis.call("EXPIRE", KEYS[9], tonumber(lease_ttl) + 60)
end
-- The hash must outlive the period (a day past it, for the reporter and
-- people reading it) and the bucket's refill from empty (after which a bucket
-- carries no information). Its expiry only ever moves later, and is set only
-- when it must (once a period, as a rule), so a plain admission is one write.
local expires_at = math.max(p_end + 86400, now_s + math.ceil(burst / rate) + 1)
local x = tonumber(state[6] or "0") or 0
local fields = {"tokens", string.format("%.17g", tokens), "ts", now_us, "used", used}
if allotted > 0 then
  local lapses = now_s + tonumber(allot_ttl)
  redis.call("HSET", KEYS[13], allot_id, allotted .. "|" .. p_start .. "|" .. lapses)
  -- The book outlives its entries by an hour and more (a lapsed one's late return
  -- still bills); its expiry is moved when that would no longer hold, or when the
  -- book may just have been made again (a return that emptied it deleted it).
  if held == 0 or (tonumber(state[9] or "0") or 0) < lapses + 3660 then
    redis.call("EXPIRE", KEYS[13], tonumber(allot_ttl) + 7200)
    table.insert(fields, "ax"); table.insert(fields, lapses + 7200)
  end
  held = held + allotted
  if held_until == 0 or lapses < held_until then held_until = lapses end
end
if allotted > 0 or swept then
  table.insert(fields, "h"); table.insert(fields, held)
  table.insert(fields, "hx"); table.insert(fields, held_until)
end
if not same_period or legacy then
  table.insert(fields, "k"); table.insert(fields, quota_period)
  table.insert(fields, "p"); table.insert(fields, p_start)
end
if x < expires_at then
  table.insert(fields, "x"); table.insert(fields, expires_at)
end
redis.call("HSET", KEYS[2], unpack(fields))
-- Relative to the script's clock (TIME in production), as every time here is.
if x < expires_at then redis.call("EXPIRE", KEYS[2], expires_at - now_s) end
if legacy then redis.call("DEL", KEYS[3]) end

-- A request id already holding a reservation cannot hold a second one (a client
-- may choose the id): this request is metered now instead.
if reservation ~= "" and redis.call("EXISTS", KEYS[6]) == 0 then
  -- Reserved: settled by record_usage.lua (the real cost; the quota moves by
  -- the difference) or, if that never comes, expired by expire_reservation.lua
  -- at the estimate. Metered usage is billed by exactly one of the two.
  local settle_by = now_s + tonumber(reservation_ttl)
  redis.call("HSET", KEYS[6], "q", cost, "m", meter, "t", now_s, "ms", month_start,
    "kind", quota_period, "p", p_start, "state", "open")
  if taken then redis.call("HSET", KEYS[6], "cr", taken) end
  redis.call("EXPIRE", KEYS[6], tonumber(reservation_ttl) + 7 * 86400)
  redis.call("ZADD", KEYS[7], settle_by, reservation)
elseif meter ~= "" then
  count_usage(KEYS[4], KEYS[5], meter, cost, now_s, month_start, "")
end

local crossed = {}
if quota_limit > 0 and thresholds ~= "" then
  for pct in string.gmatch(thresholds, "%d+") do
    local mark = quota_limit * tonumber(pct) / 100
    if used_before < mark and used >= mark then
      if redis.call("HSETNX", KEYS[8], quota_period .. ":" .. p_start .. ":" .. pct, now_s) == 1 then
        table.insert(crossed, pct)
      end
    end
  end
  if #crossed > 0 then redis.call("EXPIRE", KEYS[8], p_end - now_s + 86400) end
end
return reply(0, plan, status, tokens, full_in_ms(tokens), 0, used, p_end, table.concat(crossed, ","))
