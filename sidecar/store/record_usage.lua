-- record_usage.lua: record one usage event durably, at most once per
-- idempotency key; optionally settle the reservation Authorize made for it.
--
-- KEYS[1]  idempotency record  tw:{acct}:idem:<key hash>  -> the record's stream id
-- KEYS[2]  usage stream        tw:{acct}:usage  (fields: shared/usage_stream.lua)
-- KEYS[3]  usage totals        tw:{acct}:totals ("<meter>|<month start>" -> units)
-- KEYS[4]  reservation         tw:{acct}:rsv:<request hash> (untouched without ARGV[7])
-- KEYS[5]  reservations        tw:{acct}:rsvs
-- KEYS[6]  limits              tw:{acct}:rl  (the period counter: k, p, used)
-- KEYS[7]  leases              tw:{acct}:leases
-- KEYS[8]  legacy quota        tw:{acct}:q   (the counter before 0.2, until admit.lua moves it)
-- KEYS[9]  credits             tw:{acct}:cr  (shared/credits.lua)
-- KEYS[10] credit ledger       tw:{acct}:crl
-- ARGV[1]  meter ("" = settle the quota only, record no usage)
-- ARGV[2]  quantity (> 0)
-- ARGV[3]  when it was used (Unix s)
-- ARGV[4]  month start of ARGV[3] (Unix s), the totals' period
-- ARGV[5]  idempotency key, kept on the record for audit
-- ARGV[6]  dedupe window (s)
-- ARGV[7]  request hash whose reservation this settles ("" = none)
-- ARGV[8]  concurrency lease to release ("" = none)
-- ARGV[9]  low_balance      balances that notify when reached, comma separated
-- ARGV[10] top_up_at        the auto top-up mark for an account without its own ("" = off)
-- ARGV[11] now_us           now in microseconds, or "" to use Redis TIME (production)
--
-- Returns {"duplicate" | "recorded", record id, units recorded, quota used now,
--          balance, low, top_up}: balance is the credit balance after a settlement
--          in credits ("" when none happened); low the low_balance marks it reached
--          and top_up the id of the fall past the top-up mark it made (or of a due
--          one to report again), as admit.lua reports them ("" for none).
-- A quantity of 0 records nothing but still settles (a refund) and releases.
-- The claim and the record are one step: a retry after any failure either
-- finds the claim (and the record beside it) or finds neither.
--
-- Settling: an open reservation is replaced by the real quantity, and the
-- quota moves by the difference. One already billed at its estimate (expired)
-- records only the excess over the estimate. Without a reservation (or with
-- one already settled), usage is recorded and the quota is left alone.
-- A reservation paid from prepaid credits settles in credits, not in usage:
-- the difference is burned (above the balance: a debt) or given back to the
-- grants it came from; a burn that takes the balance past a low-balance mark or
-- the auto top-up mark reports it, exactly as an admission's burn does.

-- #include shared/usage_stream.lua
-- #include shared/credits.lua

-- A period counter where a release before 0.2 kept it moves into the limits
-- hash first (keeping the longer of the two lifetimes), as admit.lua does.
if redis.call("HEXISTS", KEYS[6], "k") == 0 then
  local old = redis.call("HMGET", KEYS[8], "k", "p", "used")
  if old[1] then
    local ttl = redis.call("PTTL", KEYS[8])
    redis.call("HSET", KEYS[6], "k", old[1], "p", old[2], "used", old[3])
    if ttl > redis.call("PTTL", KEYS[6]) then redis.call("PEXPIRE", KEYS[6], ttl) end
    redis.call("DEL", KEYS[8])
  end
end

local function quota_used()
  return tonumber(redis.call("HGET", KEYS[6], "used") or "0")
end

-- The lease goes first, even for a duplicate: a client reusing a request id for
-- calls one after another must not find the previous call still holding it.
if ARGV[8] ~= "" then
  redis.call("ZREM", KEYS[7], ARGV[8])
end
local existing = redis.call("GET", KEYS[1])
if existing then
  return {"duplicate", existing, 0, quota_used(), "", "", ""}
end

local quantity = tonumber(ARGV[2])
local to_record = quantity
local balance, low, top_up = "", "", ""
if ARGV[7] ~= "" then
  local r = redis.call("HMGET", KEYS[4], "q", "kind", "p", "state", "cr")
  if r[1] and (r[4] == "open" or r[4] == "expired") then
    local estimate = tonumber(r[1])
    local delta = quantity - estimate
    if r[4] == "expired" then
      delta = math.max(0, delta)
      to_record = delta
    end
    if r[5] then
      to_record = 0  -- paid from credits: nothing to bill
      if delta ~= 0 then
        local now_us = tonumber(ARGV[11])
        if not now_us then
          local t = redis.call("TIME")
          now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
        end
        local now = math.floor(now_us / 1000000)
        local cr = credits_lib()
        local c = cr.load(KEYS[9])
        cr.sweep(c, KEYS[10], now)
        local before = cr.balance(c)
        if delta > 0 then
          cr.burn(c, KEYS[10], now, delta)
        else
          cr.refund(c, KEYS[10], now, -delta, r[5])
        end
        balance = cr.balance(c)
        low = cr.low(c, before, balance, ARGV[9])
        top_up = cr.top_up(c, before, balance, ARGV[10], now_us)
        cr.save(c)
      end
    end
    local q = redis.call("HMGET", KEYS[6], "k", "p", "used")
    if q[1] == r[2] and q[2] == r[3] then
      redis.call("HSET", KEYS[6], "used", math.max(0, tonumber(q[3]) + delta))
    end
    redis.call("HSET", KEYS[4], "state", "settled", "settled_q", quantity)
    redis.call("ZREM", KEYS[5], ARGV[7])
  end
end

local id = "-"
if to_record > 0 and ARGV[1] ~= "" then
  id = count_usage(KEYS[2], KEYS[3], ARGV[1], to_record, ARGV[3], ARGV[4], ARGV[5])
end
redis.call("SET", KEYS[1], id, "EX", tonumber(ARGV[6]))
return {"recorded", id, to_record, quota_used(), balance, low, top_up}
