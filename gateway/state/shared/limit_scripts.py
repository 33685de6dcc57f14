"""The Lua scripts of the Redis limit store: each checks the epoch and applies its counters and rates in one run.

Redis runs a script without interleaving any other command, which is what makes
`reserve` all-or-nothing across processes. Counters are integers with their period's
TTL; a rate is a GCRA theoretical arrival time (seconds as a decimal string) that
expires once it lies in the past.
"""

from __future__ import annotations

from typing import Final

# KEYS: epoch, counters..., rates...
# ARGV: now, n_counters, n_rates, (amount, limit|'', ttl_ms|'') per counter,
#       (cost, interval_s, burst_s) per rate.
# Returns {-1} (no epoch), {1, i} (counter i over its limit), {2, j, retry_after}
# (rate j over), or {0, value_1, ..., value_n, tat_1, ..., tat_m} (applied; the counters'
# new values, then the rates' new theoretical arrival times as decimal strings).
RESERVE: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local now = tonumber(ARGV[1])
local nc = tonumber(ARGV[2])
local nr = tonumber(ARGV[3])
for i = 1, nc do
  local a = 3 + (i - 1) * 3
  local limit = ARGV[a + 2]
  if limit ~= '' then
    local v = tonumber(redis.call('GET', KEYS[1 + i]) or '0')
    if v + tonumber(ARGV[a + 1]) > tonumber(limit) then return {1, i} end
  end
end
local tats = {}
local rb = 3 + nc * 3
for j = 1, nr do
  local a = rb + (j - 1) * 3
  local tat = tonumber(redis.call('GET', KEYS[1 + nc + j]) or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[a + 1]) * tonumber(ARGV[a + 2])
  local over = tat - now - tonumber(ARGV[a + 3])
  if over > 0 then return {2, j, string.format('%.6f', over)} end
  tats[j] = tat
end
local out = {0}
for i = 1, nc do
  local a = 3 + (i - 1) * 3
  local key = KEYS[1 + i]
  out[i + 1] = redis.call('INCRBY', key, ARGV[a + 1])
  if ARGV[a + 3] ~= '' and redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, ARGV[a + 3])
  end
end
for j = 1, nr do
  local ms = math.ceil((tats[j] - now) * 1000) + 1000
  local tat = string.format('%.6f', tats[j])
  redis.call('SET', KEYS[1 + nc + j], tat, 'PX', ms)
  out[nc + 1 + j] = tat
end
return out
"""

# KEYS: epoch, counters..., rates...
# ARGV: now, n_counters, n_rates, (delta, ttl_ms|'') per counter, (delta_s) per rate.
# Returns {-1} (no epoch: nothing applied) or {0, value_1, ..., value_n}.
ADJUST: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local now = tonumber(ARGV[1])
local nc = tonumber(ARGV[2])
local nr = tonumber(ARGV[3])
local out = {0}
for i = 1, nc do
  local a = 3 + (i - 1) * 2
  local key = KEYS[1 + i]
  out[i + 1] = redis.call('INCRBY', key, ARGV[a + 1])
  if ARGV[a + 2] ~= '' and redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, ARGV[a + 2])
  end
end
local rb = 3 + nc * 2
for j = 1, nr do
  local key = KEYS[1 + nc + j]
  local cur = redis.call('GET', key)
  if cur then
    local tat = tonumber(cur) + tonumber(ARGV[rb + j])
    if tat > now then
      local ms = math.ceil((tat - now) * 1000) + 1000
      redis.call('SET', key, string.format('%.6f', tat), 'PX', ms)
    else
      redis.call('DEL', key)
    end
  end
end
return out
"""

# KEYS: counters...  ARGV: (amount, ttl_ms|'') per counter. Sets counters that are absent or 0.
SEED: Final = """
for i = 1, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if (not cur) or tonumber(cur) == 0 then
    if ARGV[2 * i] ~= '' then
      redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ARGV[2 * i])
    else
      redis.call('SET', KEYS[i], ARGV[2 * i - 1])
    end
  end
end
return 0
"""

# KEYS: epoch, marker, counters..., rates...
# ARGV: expected epoch, marker ttl_s, now, n_counters, (delta, ttl_ms|'') per counter,
#       (seconds) per rate: a rate's theoretical arrival time moves that far past max(it, now).
# Returns -1 (no epoch), -2 (another epoch), 0 (this transfer was applied before), 1 (applied).
TRANSFER: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then return -1 end
if epoch ~= ARGV[1] then return -2 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
local now = tonumber(ARGV[3])
local nc = tonumber(ARGV[4])
for i = 1, nc do
  local a = 5 + (i - 1) * 2
  local key = KEYS[2 + i]
  redis.call('INCRBY', key, ARGV[a])
  if ARGV[a + 1] ~= '' and redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, ARGV[a + 1])
  end
end
local rb = 5 + nc * 2
for j = 1, #KEYS - 2 - nc do
  local key = KEYS[2 + nc + j]
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[rb + j - 1])
  if tat > now then
    local ms = math.ceil((tat - now) * 1000) + 1000
    redis.call('SET', key, string.format('%.6f', tat), 'PX', ms)
  end
end
return 1
"""

# KEYS: rates...  ARGV: now, tat per rate. Raises each rate's theoretical arrival time to
# the given one (a rebuild from the times this process last saw); never lowers it.
SEED_RATES: Final = """
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local tat = tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > now and tat > cur then
    local ms = math.ceil((tat - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', ms)
  end
end
return 0
"""
