/**
 * The Lua scripts of the Redis backend. Each runs atomically on the master that owns its keys'
 * slot, on a single server and in a cluster alike: READ, WRITE and DELETE touch exactly one key
 * (KEYS[1]); READ_MANY reads keys that share a slot.
 *
 * An entry is a hash {v: value, ver: version, ct: created-at ms}; its expiry is the key's own
 * (PEXPIREAT), read back with PEXPIRETIME (Redis >= 7.0). A refresh only moves the expiry, so
 * keyspace notifications tell a write ("hset") from a refresh ("expire").
 *
 * Times come from the server (TIME), never from the store processes, so every store instance
 * agrees on expiry. Numbers pass as decimal strings: versions are microseconds (16 digits), which
 * Lua's doubles hold exactly but tostring() would print in exponent form.
 */

const CLOCK = `
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(n) return string.format('%.0f', n) end
`;

/**
 * Read (OP 'r'): KEYS[1] = entry; ARGV[1] = refresh TTL ms (0 = none), ARGV[2] = '1' to return the value.
 * Returns nil for a missing or expired entry, else {value or '', version, expires_at, created_at}.
 */
const READ = `
local h = redis.call('HMGET', KEYS[1], 'ver', 'ct')
if not h[1] then return false end
local exp = redis.call('PEXPIRETIME', KEYS[1])
if exp <= now_ms then return false end
local refresh = tonumber(ARGV[1])
if refresh > 0 then
  exp = now_ms + refresh
  redis.call('PEXPIREAT', KEYS[1], fmt(exp))
end
local value = ''
if ARGV[2] == '1' then value = redis.call('HGET', KEYS[1], 'v') end
return {value, h[1], fmt(exp), h[2]}
`;

/**
 * Read of many entries for a listing: KEYS = the entries (any number on a single server; one slot
 * in a cluster), ARGV[1] = '1' to return the values. Never refreshes. Answers one item per key, as
 * READ would, except that a key holding another type answers its error text instead of failing
 * the whole call.
 */
export const READ_MANY = `${CLOCK}
local with_value = ARGV[1] == '1'
local out = {}
for i, key in ipairs(KEYS) do
  local h
  if with_value then h = redis.pcall('HMGET', key, 'ver', 'ct', 'v') else h = redis.pcall('HMGET', key, 'ver', 'ct') end
  if h.err then
    out[i] = h.err
  elseif not h[1] then
    out[i] = false
  else
    local exp = redis.call('PEXPIRETIME', key)
    if exp <= now_ms then
      out[i] = false
    elseif with_value then
      out[i] = {h[3], h[1], fmt(exp), h[2]}
    else
      out[i] = {'', h[1], fmt(exp), h[2]}
    end
  end
end
return out
`;

/**
 * Write (OP 'w'): KEYS[1] = entry; ARGV[1] = value, ARGV[2] = TTL ms, ARGV[3] = expected version ('' = any,
 * '0' = must not exist). Returns {'ok', version, expires_at, created_at} or {'conflict', current}.
 * The version is max(previous + 1, server clock in µs): it grows for the key, also across delete
 * and re-create (see DELETE).
 */
const WRITE = `
local h = redis.call('HMGET', KEYS[1], 'ver', 'ct')
local previous = tonumber(h[1]) or 0
local live = previous > 0 and redis.call('PEXPIRETIME', KEYS[1]) > now_ms
local current = 0
if live then current = previous end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= current then return {'conflict', fmt(current)} end
local version = math.max(previous + 1, now_us)
local exp = now_ms + tonumber(ARGV[2])
local created = now_ms
if live then created = tonumber(h[2]) end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ver', fmt(version), 'ct', fmt(created))
redis.call('PEXPIREAT', KEYS[1], fmt(exp))
return {'ok', fmt(version), fmt(exp), fmt(created)}
`;

/**
 * Delete (OP 'd'): KEYS[1] = entry; ARGV[1] = expected version ('' = any). Returns {'ok', deleted version
 * or '0' when there was no live entry} or {'conflict', current}.
 *
 * A re-created key takes its version from the clock, so before answering we let the clock pass
 * the deleted version (it is at most a few µs ahead: several writes in the same µs). A version far
 * ahead means the clock went back (e.g. a failover to a host with another clock); we do not wait.
 */
const DELETE = `
local previous = tonumber(redis.call('HGET', KEYS[1], 'ver')) or 0
local live = previous > 0 and redis.call('PEXPIRETIME', KEYS[1]) > now_ms
local current = 0
if live then current = previous end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then return {'conflict', fmt(current)} end
if previous == 0 then return {'ok', '0'} end
redis.call('DEL', KEYS[1])
while now_us <= previous and previous - now_us < 1000 do
  t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
return {'ok', fmt(current)}
`;

/**
 * The one script a batch's operations call: ARGV[1] = 'r' (READ), 'w' (WRITE) or 'd' (DELETE),
 * then that operation's own ARGV. One script, not three: Redis can lose its script cache (SCRIPT
 * FLUSH) while ioredis believes it loaded; a pipelined call then fails with NOSCRIPT and ioredis
 * sends it again, with its script, after the rest of the pipeline. With three scripts, the calls of
 * a batch whose script was meanwhile loaded again ran in place and the others after them, out of
 * order (a put then a delete of one key left the key there); with one, all of a batch's calls fail
 * alike and are sent again in order.
 */
export const OP = `${CLOCK}
local op = ARGV[1]
local ARGV = {unpack(ARGV, 2)}
local function read()
${READ}
end
local function write()
${WRITE}
end
local function delete()
${DELETE}
end
if op == 'r' then return read() elseif op == 'w' then return write() elseif op == 'd' then return delete() end
return redis.error_reply('unknown operation ' .. tostring(op))
`;
