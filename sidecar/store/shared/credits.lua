-- credits.lua: one account's prepaid balance, for every script that changes
-- or reads it (the store's loader inlines this file where a script includes it).
--
-- The balance hash, tw:{acct}:cr:
--   g:<grant id>  "<remaining>|<expires at>" one live grant (expires at 0: never);
--                 a grant burned to 0 leaves the hash (the ledger keeps it)
--   d             debt: units settled above what the grants held (a request
--                 whose real cost exceeded its estimate); paid first by what comes in
--   bt, bq        the open burn batch: its start (Unix s) and the units burned in it
--                 (refunds subtract)
--   lo:<n>        the balance fell to n or below and that was notified; cleared
--                 when a grant lifts it above n again
--   ta            the account's own auto top-up mark (a balance), or "off"
--   tu            the fall past the top-up mark that is due a top-up (its id,
--                 "<us>-<n>": when it began, and n); cleared by the next grant
--   tr            when that fall was last reported (Unix s): a report is queued
--                 fire-and-forget, so a due fall is reported again, at most once
--                 every TOP_UP_RESEND_SECONDS, until a grant clears it
--   tn            falls past the top-up mark so far (each fall's id ends in it)
-- The ledger stream, tw:{acct}:crl, one entry per change:
--   kind grant   credits, grant, expires, reason, at
--   kind burn    credits (signed: refunds subtract), from, to (the batch's window)
--   kind expire  credits, grant, at (the grant's expiry)
-- so that, at every moment, balance = grants - burns - expiries, the open batch
-- counted with the burns. Burn order: soonest-expiring grant first, grants
-- that never expire last, then by grant id.

-- The functions are made on first use (credits_lib()), not on every run of a
-- script that includes this file: a Lua closure is made each time its definition
-- runs, and the seventeen there were cost a decision that touches no balance
-- (most of them) about 7 us of Valkey time (measured, pipelined EVALSHA of
-- admit.lua); there are twenty now.

local CREDIT_BATCH_SECONDS = 60
-- A due top-up's report may be lost (a Redis blip, a sidecar killed before its
-- queueing task ran): the fall is reported again after this long. The companion
-- charges once per fall however often it is told (webhook/top_up.py).
local TOP_UP_RESEND_SECONDS = 60

local function credits_lib()

  local function credits_load(key)
    local flat = redis.call("HGETALL", key)
    local c = {key = key, grants = {}, debt = 0, bt = nil, bq = 0, low = {}, set = {}, del = {}}
    for i = 1, #flat, 2 do
      local f, v = flat[i], flat[i + 1]
      if string.sub(f, 1, 2) == "g:" then
        local rem, exp = string.match(v, "^(%d+)|(%d+)$")
        table.insert(c.grants, {id = string.sub(f, 3), rem = tonumber(rem), exp = tonumber(exp)})
      elseif f == "d" then
        c.debt = tonumber(v)
      elseif f == "bt" then
        c.bt = tonumber(v)
      elseif f == "bq" then
        c.bq = tonumber(v)
      elseif string.sub(f, 1, 3) == "lo:" then
        c.low[tonumber(string.sub(f, 4))] = true
      elseif f == "ta" then
        c.top_up_at = tonumber(v) or "off"
      elseif f == "tu" then
        c.top_up_due = v
      elseif f == "tr" then
        c.top_up_reported = tonumber(v)
      elseif f == "tn" then
        c.top_up_falls = tonumber(v)
      end
    end
    table.sort(c.grants, function(a, b)
      local ea = a.exp == 0 and math.huge or a.exp
      local eb = b.exp == 0 and math.huge or b.exp
      if ea ~= eb then return ea < eb end
      return a.id < b.id
    end)
    return c
  end

  local function credits_balance(c)
    local sum = 0
    for _, g in ipairs(c.grants) do sum = sum + g.rem end
    return sum - c.debt
  end

  local function credits_put(c, g)
    if g.rem > 0 then
      c.set["g:" .. g.id] = g.rem .. "|" .. g.exp
      c.del["g:" .. g.id] = nil
    else
      c.set["g:" .. g.id] = nil
      c.del["g:" .. g.id] = true
    end
  end

  -- Grants past their expiry lapse: their remainder leaves the balance, on the ledger.
  local function credits_sweep(c, ledger, now)
    local live = {}
    for _, g in ipairs(c.grants) do
      if g.exp > 0 and g.exp <= now then
        if g.rem > 0 then
          redis.call("XADD", ledger, "*", "kind", "expire", "credits", g.rem, "grant", g.id,
            "at", g.exp)
        end
        g.rem = 0
        credits_put(c, g)
      else
        table.insert(live, g)
      end
    end
    c.grants = live
  end

  -- The open batch goes on the ledger once its window is over (or when force).
  local function credits_close_batch(c, ledger, now, force)
    if c.bt and (force or now >= c.bt + CREDIT_BATCH_SECONDS) then
      if c.bq ~= 0 then
        redis.call("XADD", ledger, "*", "kind", "burn", "credits", c.bq, "from", c.bt,
          "to", c.bt + CREDIT_BATCH_SECONDS)
      end
      c.bt, c.bq = nil, 0
      c.del["bt"], c.del["bq"] = true, true
      c.set["bt"], c.set["bq"] = nil, nil
    end
  end

  local function credits_count_burn(c, ledger, now, units)
    credits_close_batch(c, ledger, now, false)
    if not c.bt then
      c.bt = now - now % CREDIT_BATCH_SECONDS
      c.set["bt"], c.del["bt"] = c.bt, nil
    end
    c.bq = c.bq + units
    c.set["bq"], c.del["bq"] = c.bq, nil
  end

  -- Burns units (> 0), soonest-expiring grant first; what the grants cannot
  -- cover becomes debt (the caller checks the balance first when it must not).
  -- Returns what was taken, "<grant>|<expires>|<units>,...", for a refund.
  local function credits_burn(c, ledger, now, units)
    credits_count_burn(c, ledger, now, units)
    local left, taken = units, {}
    for _, g in ipairs(c.grants) do
      if left == 0 then break end
      local take = math.min(g.rem, left)
      if take > 0 then
        g.rem = g.rem - take
        left = left - take
        credits_put(c, g)
        table.insert(taken, g.id .. "|" .. g.exp .. "|" .. take)
      end
    end
    if left > 0 then
      c.debt = c.debt + left
      c.set["d"], c.del["d"] = c.debt, nil
    end
    return table.concat(taken, ",")
  end

  local function credits_find(c, id)
    for _, g in ipairs(c.grants) do
      if g.id == id then return g end
    end
    return nil
  end

  local function credits_add(c, id, exp, units)
    local g = credits_find(c, id)
    if g then
      g.rem = g.rem + units
    else
      g = {id = id, rem = units, exp = exp}
      table.insert(c.grants, g)
    end
    credits_put(c, g)
  end

  -- What comes in pays the debt first; returns what is left of units.
  local function credits_pay_debt(c, units)
    local paid = math.min(c.debt, units)
    if paid > 0 then
      c.debt = c.debt - paid
      if c.debt > 0 then c.set["d"] = c.debt else c.set["d"], c.del["d"] = nil, true end
    end
    return units - paid
  end

  -- Gives back units (> 0) of a burn that took `taken`, to the grants it came
  -- from, last taken first; a grant that has lapsed meanwhile lapses them too.
  local function credits_refund(c, ledger, now, units, taken)
    credits_count_burn(c, ledger, now, -units)
    local left = credits_pay_debt(c, units)
    local parts = {}
    for part in string.gmatch(taken or "", "[^,]+") do table.insert(parts, part) end
    for i = #parts, 1, -1 do
      if left == 0 then break end
      local id, exp, n = string.match(parts[i], "^(.+)|(%d+)|(%d+)$")
      exp, n = tonumber(exp), tonumber(n)
      local give = math.min(n, left)
      left = left - give
      if exp > 0 and exp <= now then
        redis.call("XADD", ledger, "*", "kind", "expire", "credits", give, "grant", id, "at", exp)
      else
        credits_add(c, id, exp, give)
      end
    end
    if left > 0 then
      -- Paid meanwhile by a later grant's settling of the debt: kept, never lapsing.
      credits_add(c, "refunds", 0, left)
    end
  end

  -- Balance thresholds crossed downwards for the first time since a grant lifted
  -- the balance above them: returns them, comma separated, and remembers them.
  local function credits_low(c, before, after, thresholds)
    local crossed = {}
    for t in string.gmatch(thresholds or "", "%-?%d+") do
      t = tonumber(t)
      if after <= t and before > t and not c.low[t] then
        c.low[t] = true
        c.set["lo:" .. t] = 1
        table.insert(crossed, t)
      end
    end
    return table.concat(crossed, ",")
  end

  -- The auto top-up mark that applies: the account's own, else default_at (a
  -- balance, or "" for none); nil when there is none or the account turned it off.
  local function credits_top_up_mark(c, default_at)
    local at = c.top_up_at
    if at == nil then at = tonumber(default_at) end
    if at == "off" then return nil end
    return at
  end

  -- Starts a new fall past the mark: due a top-up, reported now. Returns its id.
  local function credits_new_fall(c, now_us)
    local falls = (c.top_up_falls or 0) + 1
    c.top_up_due = string.format("%.0f-%d", now_us, falls)
    c.top_up_reported = math.floor(now_us / 1000000)
    c.set["tu"], c.set["tn"], c.set["tr"] = c.top_up_due, falls, c.top_up_reported
    c.del["tu"], c.del["tn"], c.del["tr"] = nil, nil, nil
    return c.top_up_due
  end

  -- The due fall's id once more if it was last reported TOP_UP_RESEND_SECONDS
  -- ago or longer (its report may have been lost), noting the report; else "".
  -- For callers with nothing to burn (a balance at zero) as much as for burns.
  local function credits_due_again(c, now_us)
    local due = c.top_up_due
    if not due then return "" end
    local now = math.floor(now_us / 1000000)
    local last = c.top_up_reported
    if last == nil then
      last = math.floor((tonumber(string.match(due, "^(%d+)%-")) or 0) / 1000000)
    end
    if now - last < TOP_UP_RESEND_SECONDS then return "" end
    c.top_up_reported = now
    c.set["tr"], c.del["tr"] = now, nil
    return due
  end

  -- The fall past the auto top-up mark (the account's own, else default_at; ""
  -- is none) that this burn made: its id ("" if none). One per fall: the next
  -- needs a grant first. A fall already due is reported again instead, once
  -- every TOP_UP_RESEND_SECONDS (credits_due_again).
  local function credits_top_up(c, before, after, default_at, now_us)
    local at = credits_top_up_mark(c, default_at)
    if at == nil then return "" end
    if c.top_up_due then return credits_due_again(c, now_us) end
    if not (after <= at and before > at) then return "" end
    return credits_new_fall(c, now_us)
  end

  local function credits_save(c)
    local fields = {}
    for f, v in pairs(c.set) do
      table.insert(fields, f)
      table.insert(fields, v)
    end
    if #fields > 0 then redis.call("HSET", c.key, unpack(fields)) end
    local gone = {}
    for f in pairs(c.del) do table.insert(gone, f) end
    if #gone > 0 then redis.call("HDEL", c.key, unpack(gone)) end
  end

  return {
    load = credits_load,
    balance = credits_balance,
    sweep = credits_sweep,
    close_batch = credits_close_batch,
    burn = credits_burn,
    add = credits_add,
    pay_debt = credits_pay_debt,
    refund = credits_refund,
    low = credits_low,
    top_up = credits_top_up,
    top_up_mark = credits_top_up_mark,
    new_fall = credits_new_fall,
    due_again = credits_due_again,
    save = credits_save,
  }
end
