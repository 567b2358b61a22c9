-- usage_stream.lua: the usage stream's fields and the totals' field names,
-- written once for every script that writes or reads them (the store's loader
-- inlines this file where a script includes it).
--
-- A usage entry:  m meter, q quantity, t when used (Unix s),
--                 ms month start of t (Unix s), k idempotency key ("" for a request)
-- A totals field: "<meter>|<month start>" -> units recorded,
--                 "r|<meter>|<month start>" -> units Stripe accepted,
--                 "d|<meter>|<day start>" -> units recorded that day (UTC), which
--                 the portal's daily chart reads

local function usage_entry(meter, quantity, at, month, idempotency)
  return "m", meter, "q", quantity, "t", at, "ms", month, "k", idempotency
end

local function usage_fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return {meter = f.m, quantity = tonumber(f.q), at = tonumber(f.t), month = f.ms, key = f.k}
end

local function totals_field(meter, month)
  return meter .. "|" .. month
end

local function billed_field(meter, month)
  return "r|" .. meter .. "|" .. month
end

-- Records used units: a stream entry for the reporter, the month's and the day's
-- totals. Returns the entry's id.
local function count_usage(stream, totals, meter, quantity, at, month, idempotency)
  local id = redis.call("XADD", stream, "*", usage_entry(meter, quantity, at, month, idempotency))
  redis.call("HINCRBY", totals, totals_field(meter, month), quantity)
  at = tonumber(at)
  redis.call("HINCRBY", totals, "d|" .. meter .. "|" .. (at - at % 86400), quantity)
  return id
end
