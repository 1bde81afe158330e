//! The Lua scripts behind [`RedisStore`](super::RedisStore).
//!
//! Each touches exactly one key (`KEYS[1]`), so every operation is one
//! round trip, atomic, and valid on Redis Cluster. An entry is one string
//! (entry format 2, read by the `entry` module): a 59-byte header of fixed
//! offsets, then the tail.
//!
//! | bytes (1-based, as Lua counts) | meaning |
//! |---|---|
//! | 1 | entry format version, `2` |
//! | 2 | `i` in flight, `d` done, `f` free (released, or a tombstone of an orphan; kept for its fence) |
//! | 3 | `1` once a waiter asked about the claim (`lease_left`), else `0` |
//! | 4–19 | the fence of the latest grant, 16 decimal digits (at least the server's clock in µs at the grant) |
//! | 20–27 | the nonce of the latest grant, 8 bytes |
//! | 28–59 | the fingerprint, 32 bytes |
//! | 60– | states `i` and `f`: the lease deadline in ms of the Redis server's clock (`TIME`), in decimal; state `d`: the stored payload |
//!
//! The layout is what makes the scripts cheap for the Redis server: a
//! replay is one `GET` whose value the script returns as it is (the client
//! reads the fingerprint and payload from it); a claim of a new key is
//! `GET`, `TIME` and one `SET … PX`; a completion `GET` and one `SET … PX`
//! of the done entry the client built (header and payload): it needs no
//! clock, since the owner's completion is kept after its lease ran out as
//! long as the entry still names it (nobody took the key over).
//! Owner checks compare one 24-byte substring (fence and nonce) with what
//! the owner sends; the waiter flag and a release change one byte in place
//! (`SETRANGE`, which keeps the key's expiry).
//!
//! Leases are judged by the server's clock only, so application servers
//! need no clock sync. A claim's key lives for the fence memory past its
//! lease (the claim sets a lease plus the fence memory, and each renewal
//! moves that past the new lease, never back), not just the lease, so the
//! fence keeps growing across takeovers within it; a completed key's entry
//! lives for the retention window.
//!
//! A claim may reach the server more than once, or late: a Redis Cluster
//! connection re-sends a command after an I/O error even when the first
//! copy was applied, and an orphan (a claim whose reply never came back)
//! can still be queued on an old connection when its release (by nonce,
//! see `ABANDON`) goes out on a new one. So the nonce in the header
//! decides: a claim that finds a live claim with its own nonce answers the
//! grant it already made (it is its own re-sent copy), and a claim that
//! finds a free entry (`f`) with its own nonce refuses (`IDEM_RELEASED`):
//! that claim was given up and released before it arrived. `ABANDON`
//! leaves such a tombstone on a key that is not another owner's: it
//! releases the claim made with the nonce, or adds the nonce to a free
//! entry, or writes a free entry with it where there is none. A free entry
//! keeps the last sixteen released nonces: its header's, and fifteen more
//! after its lease deadline (`;` and 8 bytes each), so several orphans of
//! one key (a client retrying through an outage) are each refused when
//! they arrive late. A tombstone
//! lasts until the key is claimed again or expires; a late claim that
//! arrives after another owner's claim replaced it may hold the key for a
//! lease (with nobody to own it: nothing runs twice, the key waits).
//!
//! Every script validates what it reads before its first write,
//! and fails with `IDEM_CORRUPT` on an entry it does not understand: Lua
//! scripts are atomic but not transactional, so nothing is half-written.
//! Completion and release publish the key on the store's channel, to wake
//! waiters in every process, when the claim has a waiter: a waiter marks
//! the claim in the same script that reads its lease, after it registered
//! for the notification, so no wake-up is missed, and a claim nobody waits
//! for costs no `PUBLISH` (which every subscribed process would receive and
//! dispatch).
//!
//! Entries of format 1 (a hash per key, written by earlier versions of the
//! crate) are still read: a claim replays such a completed record, waits
//! for such a claim in flight and takes over an expired or released one
//! (writing format 2 over it). A claim of format 1 is never owned by this
//! version, so completing, releasing, extending or abandoning it is refused
//! as a lost lease. (An earlier version meeting a format-2 entry fails with
//! `WRONGTYPE`: it never runs a request twice, it refuses it.)

use redis::Script;

/// Shared prologue: the entry (`r`, a string, or `false` when there is
/// none) and its state (`st`), validated. The tokens given are the Lua run
/// when the key holds something else than a string (a format-1 hash): it
/// must return or set `r`.
macro_rules! prologue {
    ($($legacy:tt)+) => {
        concat!(
            r#"
local r = redis.pcall('GET', KEYS[1])
if type(r) == 'table' then
"#,
            $($legacy)+,
            r#"
end
local st
if r then
  if #r < 59 or string.byte(r, 1) ~= 50 then return redis.error_reply('IDEM_CORRUPT unknown entry format') end
  st = string.sub(r, 2, 2)
  if st ~= 'i' and st ~= 'd' and st ~= 'f' then return redis.error_reply('IDEM_CORRUPT unknown state') end
end
"#
        )
    };
}

/// The format-1 entry (a hash) converted to format 2, for the scripts that
/// read one: its nonce is not kept (no owner of a format-1 claim uses
/// format 2), its waiter flag is `0` (its waiters are marked in the hash).
macro_rules! legacy_entry {
    () => {
        r#"
  local h = redis.call('HMGET', KEYS[1], 'v', 'st', 'fence', 'fp', 'dl', 'pl')
  local old_fence = tonumber(h[3])
  if h[1] ~= '1' or not old_fence or not h[4] or #h[4] ~= 32 then
    return redis.error_reply('IDEM_CORRUPT unknown entry format')
  end
  local tail = h[5]
  if h[2] == 'd' then tail = h[6] end
  if not tail then return redis.error_reply('IDEM_CORRUPT incomplete entry') end
  r = '2' .. h[2] .. '0' .. string.format('%016d', old_fence) .. '\0\0\0\0\0\0\0\0' .. h[4] .. tail
"#
    };
}

/// The server's clock: `t` as `TIME` answers it, `now` in ms.
macro_rules! clock {
    () => {
        "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
    };
}

/// The lease deadline (`dl`) of the entry and the server's clock in ms
/// (`now`), for an entry in state `i` or `f`.
macro_rules! lease {
    () => {
        concat!(
            r#"
local dl = tonumber(string.sub(r, 60))
if not dl then return redis.error_reply('IDEM_CORRUPT unreadable lease') end
"#,
            clock!()
        )
    };
}

/// The nonces of earlier orphans that a free entry (`f`) keeps after its
/// lease deadline (`digits`, the deadline as it is written), as
/// `released`: `;` and 8 bytes each, at most fifteen. Fails as a corrupt
/// entry on anything else there. `listed` says whether the nonce `$nonce`
/// names (a Lua expression) is the header's or one of those.
macro_rules! released {
    ($nonce:literal) => {
        concat!(
            r#"
  local released = ''
  local from = 60 + #digits
  if #r >= from then
    if string.sub(r, from, from) ~= ';' or (#r - from) % 8 ~= 0 then
      return redis.error_reply('IDEM_CORRUPT unreadable released nonces')
    end
    released = string.sub(r, from + 1)
  end
  local listed = string.sub(r, 20, 27) == "#,
            $nonce,
            r#"
  for i = 1, #released, 8 do
    if string.sub(released, i, i + 7) == "#,
            $nonce,
            r#" then listed = true end
  end
"#
        )
    };
}

/// `claim(fp, lease_ms, keep_ms, nonce)` → the fence (an integer) when
/// acquired, else the entry itself (state `i`: in flight, `d`: done).
/// `keep_ms` is the lease plus the fence memory.
///
/// A live claim made with this very nonce is this claim, sent again (a
/// cluster connection's retry after the first copy was applied): it answers
/// that grant's fence, so the caller owns it instead of waiting for itself.
/// A free entry with this nonce is a tombstone: the claim was given up and
/// released before this copy arrived, so it refuses with `IDEM_RELEASED`
/// and writes nothing (nobody waits for its answer).
///
/// A grant's fence is the larger of the previous fence plus one and the
/// server's clock in microseconds, so it never goes backwards while the
/// server's clock does not: not after the entry expired or was purged, and
/// not after Redis forgot it by restarting empty. (Microseconds since 1970
/// stay below 2^53, where Lua's numbers are exact, and take 16 digits until
/// the year 2286.)
pub(super) const CLAIM: &str = concat!(
    r#"
if #ARGV[1] ~= 32 or #ARGV[4] ~= 8 then return redis.error_reply('IDEM_ARGS fingerprint or nonce of the wrong length') end
"#,
    prologue!(legacy_entry!()),
    r#"
if st == 'd' then return r end
"#,
    clock!(),
    r#"local fence = t[1] * 1000000 + t[2]
if st then
  local digits = string.match(r, '^%d+', 60)
  local dl, prev = tonumber(digits), tonumber(string.sub(r, 4, 19))
  if not dl or not prev then return redis.error_reply('IDEM_CORRUPT unreadable entry') end
  local mine = string.sub(r, 20, 27) == ARGV[4]
  if st == 'i' and dl > now then
    if mine then return prev end
    return r
  end
  if st == 'f' then
"#,
    released!("ARGV[4]"),
    r#"
    if listed then return redis.error_reply('IDEM_RELEASED this claim was released before it arrived') end
  end
  fence = math.max(prev + 1, fence)
end
local f
if st then f = string.format('%016d', fence) else f = t[1] .. string.sub('00000' .. t[2], -6) end
if #f ~= 16 then return redis.error_reply('IDEM_CLOCK fence out of range: ' .. f) end
redis.call('SET', KEYS[1], '2i0' .. f .. ARGV[4] .. ARGV[1] .. (now + ARGV[2]), 'PX', ARGV[3])
return fence
"#
);

/// `complete(token, entry, retention_ms, channel)` → 1 held, 0 lost. The
/// token is the owner's fence (16 digits) and nonce (8 bytes); the entry is
/// the whole done entry, header and payload, as the client built it, so the
/// script copies no payload. An in-flight entry with the owner's token is
/// completed whether or not its lease ran out: a takeover would have
/// changed the token.
pub(super) const COMPLETE: &str = concat!(
    prologue!("  return 0"),
    r#"
if not r or string.sub(r, 4, 27) ~= ARGV[1] then return 0 end
if st == 'd' then return 1 end
if st ~= 'i' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if string.byte(r, 3) == 49 then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
return 1
"#
);

/// `release(token, channel)` → 1 held, 0 lost. A released entry stays
/// (state `f`) so the next grant's fence is higher.
pub(super) const RELEASE: &str = concat!(
    prologue!("  return 0"),
    r#"
if st ~= 'i' or string.sub(r, 4, 27) ~= ARGV[1] then return 0 end
"#,
    lease!(),
    r#"
redis.call('SETRANGE', KEYS[1], 1, 'f')
if string.byte(r, 3) == 49 then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
if dl > now then return 1 end
return 0
"#
);

/// `extend(token, lease_ms, keep_ms)` → 1 held, 0 lost. Never resurrects
/// an expired lease, and never shortens the key's life: it lives at least
/// `keep_ms` (the lease plus the fence memory) from now, so the entry
/// outlives the new lease by the fence memory, as the claim made it.
pub(super) const EXTEND: &str = concat!(
    prologue!("  return 0"),
    r#"
if st ~= 'i' or string.sub(r, 4, 27) ~= ARGV[1] then return 0 end
"#,
    lease!(),
    r#"
if dl <= now then return 0 end
local lease, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
if not lease or not keep then return redis.error_reply('IDEM_ARGS unreadable lease') end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], string.sub(r, 1, 59) .. (now + lease), 'PX', math.max(ttl, lease, keep))
return 1
"#
);

/// `lease_left(fence)` → ms left on the claim with this fence (16 digits),
/// or -1 when that claim is gone. Marks the claim as waited for, so that
/// its completion or release is published.
pub(super) const LEASE_LEFT: &str = concat!(
    prologue!(
        r#"
  local h = redis.call('HMGET', KEYS[1], 'st', 'fence', 'dl', 'w')
  local dl = tonumber(h[3])
  if h[1] ~= 'i' or not dl or tonumber(h[2]) ~= tonumber(ARGV[1]) then return -1 end
"#,
        clock!(),
        r#"  if dl <= now then return -1 end
  if h[4] ~= '1' then redis.call('HSET', KEYS[1], 'w', '1') end
  return dl - now"#
    ),
    r#"
if st ~= 'i' or string.sub(r, 4, 19) ~= ARGV[1] then return -1 end
"#,
    lease!(),
    r#"
if dl <= now then return -1 end
if string.byte(r, 3) ~= 49 then redis.call('SETRANGE', KEYS[1], 2, '1') end
return dl - now
"#
);

/// `purge(channel, force)` → 1 when a live claim, a record, or an
/// unreadable value was dropped, else 0; 2 when the key holds a live claim
/// and `force` is `0` (nothing is dropped). Without `force` it drops
/// anything. It does not validate the entry: purging is the operator's
/// remedy for a corrupt one.
pub(super) const PURGE: &str = concat!(
    "\n",
    clock!(),
    r#"local held, live = false, false
local r = redis.pcall('GET', KEYS[1])
if type(r) == 'string' then
  local st = string.sub(r, 2, 2)
  local digits = string.match(r, '^%d+', 60)
  if #r < 59 or string.byte(r, 1) ~= 50 or st == 'd' or (st ~= 'i' and st ~= 'f')
    or not string.match(string.sub(r, 4, 19), '^%d+$') or not digits then
    -- A record, or an entry a claim cannot read (its fence or lease):
    -- dropped without force, as nothing can own it.
    held = true
  elseif st == 'i' then
    held = tonumber(digits) > now
    live = held
  else
    -- A free entry whose released nonces a claim cannot read.
    local from = 60 + #digits
    held = #r >= from and (string.sub(r, from, from) ~= ';' or (#r - from) % 8 ~= 0)
  end
elseif type(r) == 'table' then
  local ok, h = pcall(redis.call, 'HMGET', KEYS[1], 'st', 'dl')
  local dl = ok and tonumber(h[2])
  live = ok and h[1] == 'i' and dl and dl > now
  held = not ok or h[1] == 'd' or live or (h[1] == 'i' and not dl)
    or (h[1] ~= false and h[1] ~= 'i' and h[1] ~= 'f')
end
if live and ARGV[2] == '0' then return 2 end
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], KEYS[1]) end
if held then return 1 end
return 0
"#
);

/// `inspect()` → `{entry, pttl, now}`: the entry as a claim would see it
/// (format 1 converted to format 2; `false` when there is none), the key's
/// time to live (ms; negative without one) and the server's clock (ms).
/// Changes nothing. Fails with `IDEM_CORRUPT` (or `WRONGTYPE`) on a value
/// that is no entry.
pub(super) const INSPECT: &str = concat!(
    r#"
local r = redis.pcall('GET', KEYS[1])
if type(r) == 'table' then
"#,
    legacy_entry!(),
    r#"
end
"#,
    clock!(),
    r#"return {r, redis.call('PTTL', KEYS[1]), now}
"#
);

/// `resolve(fence, payload, release, was)` → 1 when the key held a done
/// entry of this fence (16 digits) whose payload is `was`, and now holds
/// `payload` in its place (the header, fingerprint and expiry kept) or,
/// with `release` = `1`, a free entry (state `f`, its fence, nonce and
/// expiry kept, so the next grant's fence is higher); else 0 and nothing
/// changed. An operator's answer for a key whose outcome was unknown. A
/// format-1 record (a hash) is read as a claim reads it and replaced by a
/// format-2 entry.
pub(super) const RESOLVE: &str = concat!(
    prologue!(legacy_entry!()),
    r#"
if st ~= 'd' or string.sub(r, 4, 19) ~= ARGV[1] or string.sub(r, 60) ~= ARGV[4] then return 0 end
if ARGV[3] == '1' then
"#,
    clock!(),
    r#"  redis.call('SET', KEYS[1], '2f0' .. string.sub(r, 4, 59) .. now, 'KEEPTTL')
else
  redis.call('SET', KEYS[1], string.sub(r, 1, 59) .. ARGV[2], 'KEEPTTL')
end
return 1
"#
);

/// `abandon(nonce, channel, keep_ms)` → 1 when the claim made with this
/// nonce (8 bytes) was still in flight and is now released, else 0. Used
/// for an orphan, a claim whose reply never came back: it may have been
/// applied with a fence we never learned, but we know the nonce we sent.
///
/// The claim may also not have arrived yet (still queued on an old
/// connection while this runs on a new one), so the release leaves the
/// nonce behind as a tombstone that `CLAIM` refuses: the released claim
/// keeps it (state `f`), a free entry adds it to the nonces it keeps, and
/// where the key holds nothing a free entry is written with it, for
/// `keep_ms` (the lease left plus the fence memory; the key's life is
/// never shortened). An entry of another owner (in flight or done) is left
/// as it is: a late copy of the claim finds it and writes nothing, unless
/// that owner's entry is gone by the time it arrives.
pub(super) const ABANDON: &str = concat!(
    r#"
if #ARGV[1] ~= 8 or not tonumber(ARGV[3]) then return redis.error_reply('IDEM_ARGS nonce or keep of the wrong form') end
"#,
    prologue!("  return 0"),
    r#"
if st == 'i' and string.sub(r, 20, 27) == ARGV[1] then
  redis.call('SETRANGE', KEYS[1], 1, 'f')
  if string.byte(r, 3) == 49 then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
  return 1
end
if st == 'i' or st == 'd' then return 0 end
local keep = tonumber(ARGV[3])
if st == 'f' then
  local digits = string.match(r, '^%d+', 60)
  if not digits then return redis.error_reply('IDEM_CORRUPT unreadable entry') end
"#,
    released!("ARGV[1]"),
    r#"
  if not listed then
    -- The header's nonce joins the list, ours takes its place; the newest
    -- fifteen are kept.
    released = released .. string.sub(r, 20, 27)
    if #released > 120 then released = string.sub(released, -120) end
    redis.call('SET', KEYS[1], string.sub(r, 1, 19) .. ARGV[1] .. string.sub(r, 28, 59) .. digits .. ';' .. released, 'KEEPTTL')
  end
  if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
  return 0
end
"#,
    clock!(),
    r#"local f = t[1] .. string.sub('00000' .. t[2], -6)
if #f ~= 16 then return redis.error_reply('IDEM_CLOCK fence out of range: ' .. f) end
redis.call('SET', KEYS[1], '2f0' .. f .. ARGV[1] .. string.rep('\0', 32) .. now, 'PX', keep)
return 0
"#
);

/// The scripts, each sent by its hash once Redis has it.
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) extend: Script,
    pub(super) lease_left: Script,
    pub(super) purge: Script,
    pub(super) abandon: Script,
    pub(super) inspect: Script,
    pub(super) resolve: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
            lease_left: Script::new(LEASE_LEFT),
            purge: Script::new(PURGE),
            abandon: Script::new(ABANDON),
            inspect: Script::new(INSPECT),
            resolve: Script::new(RESOLVE),
        }
    }
}
