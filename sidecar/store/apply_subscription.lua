-- apply_subscription.lua: set an account's subscription state, as Stripe reports
-- it now, at most once per webhook event.
--
-- KEYS[1]  account hash        tw:{acct}:a
-- KEYS[2]  applied event ids   tw:{acct}:events  (sorted set: event id -> applied at)
-- ARGV[1]  event id ("" for reconciliation and checkout completion: no dedupe)
-- ARGV[2]  subscription id
-- ARGV[3]  status (Stripe's subscription status)
-- ARGV[4]  plan ("" = the price is in no plan: keep the current plan, record ARGV[5])
-- ARGV[5]  error to record on the account ("" clears it)
-- ARGV[6]  current period end (Unix s, 0 if unknown)
-- ARGV[7]  grace period in seconds
-- ARGV[8]  when the payment trouble started, if status is past_due (Unix s)
-- ARGV[9]  how long to remember event ids (s), beyond Stripe's 3-day retries
--
-- Returns {result, old_status, new_status, old_plan, new_plan, grace_until}
--   result: "duplicate" (event seen before; nothing changed),
--           "kept" (the account is paid for by another live subscription; this
--                   one ended, which must not lock a paying customer out),
--           "applied".
-- The state written is the latest Stripe reported, so applying it twice, or
-- after a newer event, is harmless; the caller serializes fetch + apply per
-- account so an older read never lands after a newer one.

local t = redis.call("TIME")
local now = tonumber(t[1])
local event_id = ARGV[1]
if event_id ~= "" and redis.call("ZSCORE", KEYS[2], event_id) then
  return {"duplicate", "", "", "", "", 0}
end

local cur = redis.call("HMGET", KEYS[1], "plan", "status", "subscription_id", "past_due_since")
local old_plan, old_status, old_sub = cur[1] or "", cur[2] or "", cur[3] or ""
local since = tonumber(cur[4] or "0") or 0
local sub, status = ARGV[2], ARGV[3]

local function live(s)
  return s == "active" or s == "trialing" or s == "past_due"
end

local result = "applied"
local plan, grace_until = old_plan, 0
if old_sub ~= "" and old_sub ~= sub and live(old_status) and not live(status) then
  result = "kept"
  status = old_status
  grace_until = tonumber(redis.call("HGET", KEYS[1], "grace_until") or "0") or 0
else
  if ARGV[4] ~= "" then plan = ARGV[4] end
  if status == "past_due" then
    local started = tonumber(ARGV[8])
    if since == 0 or started < since then since = started end
    grace_until = since + tonumber(ARGV[7])
  else
    since = 0
  end
  redis.call("HSET", KEYS[1],
    "plan", plan, "status", status, "subscription_id", sub,
    "past_due_since", since, "grace_until", grace_until,
    "period_end", ARGV[6], "error", ARGV[5], "synced_at", now)
  redis.call("HSETNX", KEYS[1], "created_at", now)
end

if event_id ~= "" then
  local keep = tonumber(ARGV[9])
  redis.call("ZADD", KEYS[2], now, event_id)
  redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", now - keep)
  redis.call("EXPIRE", KEYS[2], keep)
end
return {result, old_status, status, old_plan, plan, grace_until}
