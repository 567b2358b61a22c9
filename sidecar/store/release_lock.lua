-- release_lock.lua: delete a lock only if we still hold it.
--
-- KEYS[1]  the lock          tw:{acct}:lock
-- ARGV[1]  our token
-- Returns 1 if released, 0 if it had expired or another holder took it.
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
