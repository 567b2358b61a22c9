-- grant_credits.lua: add a grant to an account's prepaid balance, at most once
-- per grant id (a Checkout Session, a payment, an operator's grant).
--
-- KEYS[1]  credits   tw:{acct}:cr   the balance (shared/credits.lua)
-- KEYS[2]  ledger    tw:{acct}:crl
-- KEYS[3]  granted   tw:{acct}:crg  grant id -> its ledger entry, kept for good
-- ARGV[1]  grant id
-- ARGV[2]  credits (> 0)
-- ARGV[3]  expires at (Unix s; 0 = never)
-- ARGV[4]  reason (free text for people, e.g. "pack 10k" or "promotion")
-- ARGV[5]  now (Unix s), or "" to use Redis TIME (production)
-- ARGV[6]  top_up_at  the auto top-up mark for an account without its own ("" = off)
--
-- Returns {"granted" | "duplicate" | "expired", balance after, top_up}. A grant
-- whose expiry has already passed is refused (nothing changes): it would lapse at
-- once. What comes in pays a debt first; low-balance marks the balance is now
-- above are cleared, so the next fall past them notifies again, and so is a
-- top-up due (this grant may be it). A grant that leaves the balance at or below
-- the top-up mark starts a new fall at once (no burn could: a fall needs the
-- balance above the mark before it): top_up is its id, for the caller to queue
-- ("" for none). Only a grant starts one, so a declined top-up (no grant) never
-- loops; a pack too small to lift the balance above the mark is bought again.

-- #include shared/credits.lua

local cr = credits_lib()

local now_us
if ARGV[5] ~= "" then
  now_us = tonumber(ARGV[5]) * 1000000
else
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now = math.floor(now_us / 1000000)
local id, units, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local c = cr.load(KEYS[1])
cr.sweep(c, KEYS[2], now)
if redis.call("HEXISTS", KEYS[3], id) == 1 then
  cr.save(c)
  return {"duplicate", cr.balance(c), ""}
end
if expires > 0 and expires <= now then
  cr.save(c)
  return {"expired", cr.balance(c), ""}
end
local entry = redis.call("XADD", KEYS[2], "*", "kind", "grant", "credits", units, "grant", id,
  "expires", expires, "reason", ARGV[4], "at", now)
redis.call("HSET", KEYS[3], id, entry)
local left = cr.pay_debt(c, units)
if left > 0 then cr.add(c, id, expires, left) end
local balance = cr.balance(c)
if c.top_up_due then
  c.top_up_due, c.top_up_reported = nil, nil
  c.del["tu"], c.set["tu"] = true, nil
  c.del["tr"], c.set["tr"] = true, nil
end
for t in pairs(c.low) do
  if balance > t then
    c.low[t] = nil
    c.del["lo:" .. t], c.set["lo:" .. t] = true, nil
  end
end
local top_up = ""
local at = cr.top_up_mark(c, ARGV[6])
if at ~= nil and balance <= at then top_up = cr.new_fall(c, now_us) end
cr.save(c)
return {"granted", balance, top_up}
