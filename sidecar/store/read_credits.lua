-- read_credits.lua: an account's prepaid balance as of now, for people and APIs.
--
-- KEYS[1]  credits   tw:{acct}:cr   the balance (shared/credits.lua)
-- KEYS[2]  ledger    tw:{acct}:crl
-- ARGV[1]  now (Unix s), or "" to use Redis TIME (production)
--
-- Sweeps lapsed grants and closes a burn batch whose window is over (both go
-- on the ledger, as a decision would write them), then returns
-- {balance, debt, open batch units, grants} with grants flattened as
-- {id, remaining, expires at, ...}, soonest-expiring first.

-- #include shared/credits.lua

local cr = credits_lib()

local now = tonumber(ARGV[1] ~= "" and ARGV[1] or redis.call("TIME")[1])
local c = cr.load(KEYS[1])
cr.sweep(c, KEYS[2], now)
cr.close_batch(c, KEYS[2], now, false)
cr.save(c)
local grants = {}
for _, g in ipairs(c.grants) do
  table.insert(grants, g.id)
  table.insert(grants, g.rem)
  table.insert(grants, g.exp)
end
return {cr.balance(c), c.debt, c.bq, grants}
