//! The Lua scripts behind [`RedisStore`](super::RedisStore).
//!
//! Each touches exactly one key (`KEYS[1]`), so every operation is one
//! round trip, atomic, and valid on Redis Cluster. A record is a hash:
//!
//! | field | meaning |
//! |---|---|
//! | `v` | record format version (`1`) |
//! | `st` | `i` in flight, `d` done, `f` free (released; kept for its fence) |
//! | `fence`, `nonce` | the owner token of the latest grant (fences are at least the server's clock in µs at the grant) |
//! | `fp` | the fingerprint (32 bytes) |
//! | `dl` | the lease deadline, in ms of the Redis server's clock (`TIME`); meaningful in state `i` only |
//! | `w` | `1` once a waiter asked about the claim (`lease_left`), else `0` |
//! | `pl` | the stored payload (when done) |
//!
//! Leases are judged by the server's clock only, so application servers
//! need no clock sync. The key lives for the retention window (plus one
//! lease), not just the lease, so the fence keeps growing across takeovers
//! within it. Every script validates what it reads before its first write,
//! and fails with `IDEM_CORRUPT` on a record it does not understand: Lua
//! scripts are atomic but not transactional, so nothing is half-written.
//! Completion and release publish the key on the store's channel, to wake
//! waiters in every process, when the claim has a waiter (`w`): a waiter
//! marks the claim in the same script that reads its lease, after it
//! registered for the notification, so no wake-up is lost, and a claim
//! nobody waits for costs no `PUBLISH` (which every subscribed process
//! would receive and dispatch).
//!
//! Each `redis.call` from Lua costs microseconds of server time, so the
//! scripts make as few as they can: a replay is one `HMGET`; a claim of a
//! new key `HMGET`, `TIME`, `HSET`, `PEXPIRE`; a completion the same.

/// Shared prologue: the record, validated, and whether its claim is live.
/// `$extra` names more fields to read in the same `HMGET` (from `h[8]` on).
/// The server's clock is read (`TIME`) only when a claim's deadline is at
/// stake, so a replay is one `HMGET` and nothing else.
macro_rules! prologue {
    ($extra:literal) => {
        concat!(
            r#"
local h = redis.call('HMGET', KEYS[1], 'v', 'st', 'fence', 'nonce', 'fp', 'dl', 'w'"#,
            $extra,
            r#")
local v, st, fence, nonce, fp, dl, w = h[1], h[2], tonumber(h[3]), h[4], h[5], tonumber(h[6]), h[7]
if v and v ~= '1' then return redis.error_reply('IDEM_CORRUPT unknown record version ' .. v) end
if v and (not st or not fence or not nonce or not fp or (st == 'i' and not dl)) then
  return redis.error_reply('IDEM_CORRUPT incomplete record')
end
if st and st ~= 'i' and st ~= 'd' and st ~= 'f' then return redis.error_reply('IDEM_CORRUPT unknown state') end
local now_us
local function clock()
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(now_us / 1000)
end
local now
local live = false
if st == 'i' then
  now = clock()
  live = dl > now
end
"#
        )
    };
}

/// `claim(fp, lease_ms, keep_ms, nonce)` →
/// `{1, fence}` acquired, `{2, fp, fence}` in flight, `{3, fp, payload}` done.
///
/// A grant's fence is the larger of the previous fence plus one and the
/// server's clock in microseconds, so it never goes backwards while the
/// server's clock does not: not after the record expired or was purged, and
/// not after Redis lost it by restarting empty. (Microseconds since 1970
/// stay below 2^53, where Lua's numbers are exact; `%d` writes the fence
/// without Lua's default exponent notation.)
pub(super) const CLAIM: &str = concat!(
    prologue!(", 'pl'"),
    r#"
if st == 'd' then
  if not h[8] then return redis.error_reply('IDEM_CORRUPT done without a payload') end
  return {3, fp, h[8]}
end
if live then return {2, fp, fence} end
now = now or clock()
local next_fence = math.max((fence or 0) + 1, now_us)
redis.call('HSET', KEYS[1], 'v', '1', 'st', 'i', 'fence', string.format('%d', next_fence), 'nonce', ARGV[4],
  'fp', ARGV[1], 'dl', now + tonumber(ARGV[2]), 'w', '0')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, next_fence}
"#
);

/// `complete(fence, nonce, payload, retention_ms, channel)` → 1 held, 0 lost.
pub(super) const COMPLETE: &str = concat!(
    prologue!(""),
    r#"
local mine = fence == tonumber(ARGV[1]) and nonce == ARGV[2]
if st == 'd' and mine then return 1 end
if not (live and mine) then return 0 end
redis.call('HSET', KEYS[1], 'st', 'd', 'pl', ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
if w == '1' then redis.call('PUBLISH', ARGV[5], KEYS[1]) end
return 1
"#
);

/// `release(fence, nonce, channel)` → 1 held, 0 lost. A released record
/// stays (state `f`) so the next grant's fence is higher.
pub(super) const RELEASE: &str = concat!(
    prologue!(""),
    r#"
if not (st == 'i' and fence == tonumber(ARGV[1]) and nonce == ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'st', 'f')
if w == '1' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
if live then return 1 end
return 0
"#
);

/// `extend(fence, nonce, lease_ms)` → 1 held, 0 lost. Never resurrects an
/// expired lease, and never shortens the key's life.
pub(super) const EXTEND: &str = concat!(
    prologue!(""),
    r#"
if not (live and fence == tonumber(ARGV[1]) and nonce == ARGV[2]) then return 0 end
local lease = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'dl', now + lease)
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return 1
"#
);

/// `lease_left(fence)` → ms left on the claim with this fence, or -1 when
/// that claim is gone. Marks the claim as waited for (`w`), so that its
/// completion or release is published.
pub(super) const LEASE_LEFT: &str = concat!(
    prologue!(""),
    r#"
if live and fence == tonumber(ARGV[1]) then
  if w ~= '1' then redis.call('HSET', KEYS[1], 'w', '1') end
  return dl - now
end
return -1
"#
);

/// `purge(channel)` → 1 when a live claim, a record, or an unreadable
/// value was dropped, else 0. It does not validate the record: purging is
/// the operator's remedy for a corrupt one.
pub(super) const PURGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok, h = pcall(redis.call, 'HMGET', KEYS[1], 'st', 'dl')
local held
if ok then
  held = h[1] == 'd' or (h[1] == 'i' and tonumber(h[2]) ~= nil and tonumber(h[2]) > now)
    or (h[1] ~= false and h[1] ~= 'i' and h[1] ~= 'd' and h[1] ~= 'f')
else
  held = true
end
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], KEYS[1]) end
if held then return 1 end
return 0
"#;

/// `abandon(nonce, channel)` → 1 when the claim made with this nonce was
/// still in flight and is now released, else 0. Used after a claim whose
/// reply was lost: the claim may have been applied with a fence we never
/// learned, but we know the nonce we sent.
pub(super) const ABANDON: &str = concat!(
    prologue!(""),
    r#"
if not (st == 'i' and nonce == ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'st', 'f')
if w == '1' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
"#
);
