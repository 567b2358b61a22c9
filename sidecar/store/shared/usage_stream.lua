-- usage_stream.lua: the usage stream's fields and the totals' field names,
-- written once for every script that writes or reads them (the store's loader
-- inlines this file where a script includes it).
--
-- A usage entry:  m meter, q quantity, t when used (Unix s),
--                 ms month start of t (Unix s), k idempotency key ("" for a request)
-- A totals field: "<meter>|<month start>" -> units recorded,
--                 "r|<meter>|<month start>" -> units Stripe accepted

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
