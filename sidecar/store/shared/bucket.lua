-- bucket.lua: the clock and the token bucket's refill, written once for every
-- script that reads a bucket (the store's loader inlines this file).

-- The script's clock in microseconds: the caller's (tests pass one), else Redis TIME.
local function clock_us(given)
  if given ~= "" then return tonumber(given) end
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A bucket's level at now_us: `tokens` as written at `ts` (µs), refilled at `rate`
-- per second, never above cap; a bucket never written (tokens nil) is full.
local function refilled(tokens, ts, now_us, rate, cap)
  if not tokens then return cap end
  local elapsed = math.max(0, now_us - tonumber(ts))
  return math.min(cap, tonumber(tokens) + elapsed * rate / 1000000)
end
