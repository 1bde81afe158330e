//! The SQL of [`PostgresStore`](super::PostgresStore), for one table.
//!
//! A row per key: `state` 0 is a claim (in flight), 1 a completed record,
//! 2 a released claim (kept for its fence until `expires_at`). Every lease
//! and expiry is computed by the server (`clock_timestamp()`), never from
//! the client's clock; durations travel as milliseconds. Fences start from
//! the server's clock in microseconds and grow by at least one per grant,
//! so they never go backwards, even after a row was removed.
//!
//! The row of a claim lives until `expires_at`, which is kept at least the
//! store's fence memory past `lease_until`: the claim sets it a lease plus
//! the fence memory ahead, and every renewal moves it as far past the new
//! lease (never back), so a claim renewed for longer than the fence memory
//! is never taken for an expired row. The cleanup also skips every row
//! whose lease is live, whatever its `expires_at` says (rows written by
//! earlier versions, whose renewals did not move it). A claim whose effect
//! was committed and whose outcome is unknown (`state` 0, `effect_committed`)
//! answers "outcome unknown" until its `expires_at`, then expires like a
//! completed record: the claim statement takes it over and the cleanup
//! removes it.
//!
//! The table name is always written quoted (`"order"`), so a name that is a
//! reserved word works: [`is_valid_table_name`] admits only characters that
//! need no escaping inside the quotes, and the quoted lower-case name is the
//! same table as the unquoted one that earlier versions wrote.

/// A claim: the row is in flight.
pub(super) const CLAIMED: i16 = 0;
/// A completed record.
pub(super) const COMPLETED: i16 = 1;

/// The longest table name accepted (PostgreSQL truncates identifiers at 63
/// bytes; the index names add a suffix).
pub(super) const MAX_TABLE_NAME: usize = 48;

/// Whether `name` is a plain lower-case SQL identifier (`[a-z_][a-z0-9_]*`,
/// at most [`MAX_TABLE_NAME`] bytes), safe to put in SQL text unquoted.
pub(super) fn is_valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= MAX_TABLE_NAME
}

/// `name` as a quoted SQL identifier (`"name"`). Only for names that passed
/// [`is_valid_table_name`], which contain no `"` to escape.
pub(super) fn quoted(name: &str) -> String {
    format!("\"{name}\"")
}

/// Whether `nonce` is among those a released row (`r`) keeps: its
/// header's, or one of the 8-byte nonces in its `payload`. (A match across
/// the boundary of two kept nonces is a one-in-2^64 chance, and could only
/// refuse a claim, never let one run twice.)
fn listed(nonce: &str) -> String {
    format!(
        "(r.nonce = {nonce} OR position(int8send({nonce}) IN coalesce(r.payload, ''::bytea)) > 0)"
    )
}

/// The statements, with the table name in them.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) migrate: String,
    pub(super) claim: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) abandon: String,
    pub(super) extend: String,
    pub(super) probe: String,
    pub(super) purge: String,
    pub(super) fence: String,
    pub(super) cleanup: String,
    pub(super) inspect: String,
    pub(super) list: String,
    pub(super) drop_entry: String,
    pub(super) resolve: String,
}

/// The columns an operator's statements read, after the key: the fence,
/// state, payload, and whether the lease is live, whether the row is kept,
/// whether the effect was committed, then the lease left and the time to
/// expiry in ms, the request's method and path, and when the answer was
/// stored (s since 1970). (`clock` is the statement's clock.)
const SEEN: &str = "fence, state, payload, lease_until > clock.t, expires_at > clock.t,
    effect_committed,
    (extract(epoch FROM lease_until - clock.t) * 1000)::float8,
    (extract(epoch FROM expires_at - clock.t) * 1000)::float8,
    method, path, extract(epoch FROM completed_at)::float8";

impl Statements {
    /// The statements on the table `name`, which must be a valid table
    /// name. It is quoted wherever it appears, so a reserved word (`order`,
    /// `user`) is a table name like any other.
    pub(super) fn for_table(name: &str) -> Self {
        let table = quoted(name);
        Self {
            migrate: migrate(name),
            // A live row (a completed record, a claim in flight) is only
            // read: the insert runs only when no live row was seen, so a
            // replay takes no lock, writes nothing and waits for no commit
            // to reach the disk. An expired or released row is taken over
            // by the conflict clause, which re-checks it under its lock. A
            // claim whose effect was committed stays live (outcome unknown)
            // until its `expires_at`, like a completed record.
            //
            // $4 is the lease, $5 the lease plus the fence memory (ms).
            claim: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t),
                 live AS (
                   SELECT fence, state, fingerprint, payload, effect_committed,
                          lease_until <= clock.t AS lapsed
                   FROM {table}, clock
                   WHERE key = $1
                     AND ((state = 0 AND (lease_until > clock.t
                                          OR (effect_committed AND expires_at > clock.t)))
                       OR (state = 1 AND expires_at > clock.t))
                 ),
                 taken AS (
                   INSERT INTO {table} AS r
                     (key, fingerprint, fence, nonce, state, lease_until, expires_at, effect_committed, payload,
                      method, path)
                   SELECT $1, $2, (extract(epoch FROM clock.t) * 1000000)::bigint, $3, 0,
                          clock.t + $4::float8 * interval '1 millisecond',
                          clock.t + $5::float8 * interval '1 millisecond', false, NULL,
                          $6::text, $7::text
                   FROM clock
                   WHERE NOT EXISTS (SELECT 1 FROM live)
                   ON CONFLICT (key) DO UPDATE SET
                     method = excluded.method,
                     path = excluded.path,
                     completed_at = NULL,
                     fingerprint = excluded.fingerprint,
                     fence = GREATEST(r.fence + 1, excluded.fence),
                     nonce = excluded.nonce,
                     state = 0,
                     lease_until = excluded.lease_until,
                     expires_at = excluded.expires_at,
                     effect_committed = false,
                     payload = NULL,
                     waited = false
                   WHERE (r.state = 2 AND NOT {refused})
                      OR (r.state = 0 AND r.lease_until <= clock_timestamp()
                          AND (NOT r.effect_committed OR r.expires_at <= clock_timestamp()))
                      OR (r.state = 1 AND r.expires_at <= clock_timestamp())
                   RETURNING r.fence
                 )
                 SELECT true, fence, NULL::smallint, NULL::bytea, NULL::bytea, false, false FROM taken
                 UNION ALL
                 SELECT false, fence, state, fingerprint, payload, effect_committed, lapsed FROM live",
                refused = listed("excluded.nonce"),
            ),
            complete: format!(
                "WITH done AS (
                   UPDATE {table}
                   SET state = 1, payload = $4, fingerprint = $5,
                       lease_until = clock_timestamp(), completed_at = clock_timestamp(),
                       expires_at = clock_timestamp() + $6::float8 * interval '1 millisecond'
                   WHERE key = $1 AND fence = $2 AND nonce = $3 AND state = 0
                   RETURNING key, waited
                 )
                 SELECT EXISTS (SELECT 1 FROM done)
                     OR EXISTS (SELECT 1 FROM {table}
                                WHERE key = $1 AND fence = $2 AND nonce = $3 AND state = 1),
                        (SELECT pg_notify($7, encode(key, 'hex')) FROM done WHERE waited)::text"
            ),
            // A claim whose effect was committed stays a claim (state 0):
            // its outcome is unknown from now on, and is answered so for the
            // fence memory ($5, ms) from now, then expires. `expires_at`
            // never moves back.
            release: format!(
                "WITH freed AS (
                   UPDATE {table}
                   SET state = CASE WHEN effect_committed THEN 0 ELSE 2 END,
                       lease_until = clock_timestamp(),
                       expires_at = CASE WHEN effect_committed
                         THEN GREATEST(expires_at, clock_timestamp() + $5::float8 * interval '1 millisecond')
                         ELSE expires_at END
                   WHERE key = $1 AND fence = $2 AND nonce = $3 AND state = 0
                   RETURNING key, waited
                 )
                 SELECT EXISTS (SELECT 1 FROM freed),
                        (SELECT pg_notify($4, encode(key, 'hex')) FROM freed WHERE waited)::text"
            ),
            // An orphan (a claim whose reply never came back), released by the
            // nonce it was sent with (nobody holds its token); the key comes as
            // hex, the name the abandon queue keeps and the notification
            // carries. The claim may not have arrived yet (still on a
            // connection that stopped answering), so where it is not found the
            // nonce is left behind as a tombstone the late claim refuses: on a
            // released row (`state` 2) it joins the nonces the row keeps (the
            // header's, and the newest fifteen before it in `payload`, 8 bytes
            // each); where the key holds nothing live it becomes a released row
            // of its own, for $4 (ms: the lease left and the fence memory).
            // The claim may also be committed while this statement runs (two
            // backends at once, after the server froze): the update does not
            // see it, the insert waits for it, then finds it under its own
            // nonce and releases it. Another owner's claim or record is left
            // alone. `expires_at` never moves back.
            abandon: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t),
                 freed AS (
                   UPDATE {table} SET state = 2, lease_until = clock.t FROM clock
                   WHERE key = decode($1, 'hex') AND nonce = $2 AND state = 0 AND NOT effect_committed
                   RETURNING key
                 ),
                 marked AS (
                   INSERT INTO {table} AS r
                     (key, fingerprint, fence, nonce, state, lease_until, expires_at, effect_committed, payload)
                   SELECT decode($1, 'hex'), ''::bytea,
                          (extract(epoch FROM clock.t) * 1000000)::bigint, $2, 2, clock.t,
                          clock.t + $4::float8 * interval '1 millisecond', false, NULL
                   FROM clock
                   WHERE NOT EXISTS (SELECT 1 FROM freed)
                   ON CONFLICT (key) DO UPDATE SET
                     nonce = CASE WHEN {listed} THEN r.nonce ELSE excluded.nonce END,
                     payload = CASE
                       WHEN r.state <> 2 THEN NULL
                       WHEN {listed} THEN r.payload
                       ELSE substring(coalesce(r.payload, ''::bytea) || int8send(r.nonce)
                                      FROM greatest(1, length(coalesce(r.payload, ''::bytea)) - 111))
                     END,
                     fingerprint = CASE WHEN r.state = 2 THEN r.fingerprint ELSE excluded.fingerprint END,
                     fence = GREATEST(r.fence, excluded.fence),
                     state = 2,
                     lease_until = LEAST(r.lease_until, excluded.lease_until),
                     expires_at = GREATEST(r.expires_at, excluded.expires_at),
                     effect_committed = false
                   WHERE r.state = 2
                      OR (r.state = 0 AND r.nonce = excluded.nonce AND NOT r.effect_committed)
                      OR (r.expires_at <= clock_timestamp()
                          AND NOT (r.state = 0 AND r.lease_until > clock_timestamp()))
                   RETURNING r.key
                 )
                 SELECT EXISTS (SELECT 1 FROM freed),
                        (SELECT pg_notify($3, $1)
                         FROM (SELECT key FROM freed UNION ALL SELECT key FROM marked) AS n
                         LIMIT 1)",
                listed = listed("excluded.nonce"),
            ),
            // The row's life moves with the lease ($5: the lease plus the
            // fence memory, ms), never back: a claim renewed for longer than
            // its first `expires_at` is never cleaned up under its owner.
            extend: format!(
                "UPDATE {table}
                 SET lease_until = clock_timestamp() + $4::float8 * interval '1 millisecond',
                     expires_at = GREATEST(expires_at,
                                           clock_timestamp() + $5::float8 * interval '1 millisecond')
                 WHERE key = $1 AND fence = $2 AND nonce = $3 AND state = 0
                   AND (lease_until > clock_timestamp() OR effect_committed)"
            ),
            // Whether the claim with fence $2 is live (and its lease left, in
            // ms), and its mark that a
            // waiter listens (set once, after the waiter subscribed), so that
            // its completion or release notifies: a claim nobody waits for
            // completes without `NOTIFY`, whose commit takes a lock every
            // notifying transaction in the database queues on. A row locked
            // by its owner's fenced transaction is not waited behind: it is
            // marked at a later check. $3 false (a store without
            // notifications, whose waiters only look again) marks nothing.
            probe: format!(
                "WITH live AS (
                   SELECT waited,
                          (extract(epoch FROM lease_until - clock_timestamp()) * 1000)::float8 AS left_ms
                   FROM {table}
                   WHERE key = $1 AND fence = $2 AND state = 0 AND lease_until > clock_timestamp()
                 ),
                 marked AS (
                   UPDATE {table} SET waited = true
                   WHERE key IN (SELECT key FROM {table}
                                 WHERE key = $1 AND fence = $2 AND state = 0 AND NOT waited
                                   AND $3::bool AND EXISTS (SELECT 1 FROM live)
                                 FOR UPDATE SKIP LOCKED)
                   RETURNING key
                 )
                 SELECT EXISTS (SELECT 1 FROM live),
                        EXISTS (SELECT 1 FROM live WHERE waited) OR EXISTS (SELECT 1 FROM marked),
                        (SELECT left_ms FROM live)"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE key = $1
                 RETURNING (state = 0 AND lease_until > clock_timestamp())
                        OR (state = 0 AND effect_committed AND expires_at > clock_timestamp())
                        OR (state = 1 AND expires_at > clock_timestamp())"
            ),
            fence: format!(
                "UPDATE {table} SET effect_committed = true
                 WHERE key = $1 AND fence = $2 AND nonce = $3 AND state = 0
                 RETURNING lease_until > clock_timestamp()"
            ),
            // An operator's statements (`Admin`): they read the columns
            // `SEEN` names and change a row only by its key and fence.
            inspect: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t)
                 SELECT key, {SEEN} FROM {table}, clock WHERE key = $1"
            ),
            // A page of rows in fence order after ($1, $2), the last row of
            // the previous page: the index on (fence, key) reads it.
            list: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t)
                 SELECT key, {SEEN} FROM {table}, clock
                 WHERE (fence, key) > ($1, $2)
                 ORDER BY fence, key LIMIT $3"
            ),
            // Drops the row, unless it is a live claim and $2 (force) is
            // false. Answers whether a live entry was dropped (NULL when
            // nothing was), and whether a live claim was there.
            drop_entry: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t),
                 gone AS (
                   DELETE FROM {table} USING clock
                   WHERE key = $1 AND ($2 OR NOT (state = 0 AND lease_until > clock.t))
                   RETURNING (state = 0 AND lease_until > clock.t)
                          OR (state = 0 AND effect_committed AND expires_at > clock.t)
                          OR (state = 1 AND expires_at > clock.t)
                          OR state NOT IN (0, 1, 2) AS held
                 )
                 SELECT (SELECT bool_or(held) FROM gone),
                        EXISTS (SELECT 1 FROM {table}, clock
                                WHERE key = $1 AND state = 0 AND lease_until > clock.t)"
            ),
            // Settles a key whose outcome is unknown (a record, or a claim
            // whose effect was committed and whose lease ran out) by its
            // fence ($2), only if it still holds what was read: $5 is the
            // state read, $6 the record's payload. $3 releases it (state 2,
            // its fence kept), else $4 becomes its record. Its fingerprint
            // and expiry are kept. (Its owner may still store its answer
            // late, under the same fence: the state and payload tell. A
            // stored answer takes another nonce, so an owner that answers
            // after it learns that its answer was not kept.)
            resolve: format!(
                "WITH clock AS (SELECT clock_timestamp() AS t),
                 done AS (
                   UPDATE {table} AS r
                   SET state = CASE WHEN $3 THEN 2 ELSE 1 END,
                       nonce = CASE WHEN $3 THEN r.nonce ELSE r.nonce # 1 END,
                       payload = $4,
                       effect_committed = false,
                       lease_until = LEAST(r.lease_until, clock.t),
                       completed_at = CASE WHEN $3 THEN r.completed_at ELSE clock.t END
                   FROM clock
                   WHERE r.key = $1 AND r.fence = $2 AND r.expires_at > clock.t AND r.state = $5
                     AND ((r.state = 1 AND r.payload = $6)
                          OR (r.state = 0 AND r.effect_committed AND r.lease_until <= clock.t))
                   RETURNING r.key
                 )
                 SELECT EXISTS (SELECT 1 FROM done)"
            ),
            // Never a row whose lease is live, whatever its `expires_at`
            // says: its owner is running, and a duplicate would insert a
            // fresh claim and run again. Rows whose outcome is unknown go
            // once their `expires_at` passed, like completed records. The
            // conditions are checked again under the row lock (`FOR UPDATE`
            // re-reads a row updated meanwhile), so a renewal that commits
            // first keeps its row.
            cleanup: format!(
                "DELETE FROM {table} WHERE key IN (
                   SELECT key FROM {table}
                   WHERE expires_at < clock_timestamp()
                     AND NOT (state = 0 AND lease_until > clock_timestamp())
                   LIMIT $1 FOR UPDATE SKIP LOCKED
                 )"
            ),
        }
    }
}

/// The migration: the table and its indexes, created if missing, and the
/// columns an operator reads (the request's method and path, when its
/// answer was stored; when it was claimed, its fence tells) added to a table an earlier version made: the
/// catalog is read first, so the `ALTER TABLE` (and its exclusive lock,
/// which would wait for every open transaction on the table) runs once,
/// not at every start. The indexes likewise, by name in the table's own
/// schema: `CREATE INDEX IF NOT EXISTS` takes the table's share lock
/// before it looks, so at every start it would wait for every open
/// writing transaction on the table (a fenced handler's) and hold every
/// new write behind it meanwhile. The index on fence and key (for an operator's
/// listing) is built without `CONCURRENTLY`: on a large table made by an
/// earlier version, build it yourself first with
/// `CREATE INDEX CONCURRENTLY "<table>_fence" ON "<table>" (fence, key)`.
/// Safe to
/// run from many processes at once: a transaction-scoped advisory lock
/// makes them take turns (concurrent `CREATE TABLE IF NOT EXISTS` can
/// otherwise fail on the catalog's unique index).
///
/// `name` is a valid table name: it goes unquoted into the advisory lock's
/// string literal (it holds no `'`), quoted everywhere else.
fn migrate(name: &str) -> String {
    let table = quoted(name);
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('tower_idempotency_migrate:{name}'));
         CREATE TABLE IF NOT EXISTS {table} (
             key              bytea       PRIMARY KEY,
             fingerprint      bytea       NOT NULL,
             fence            bigint      NOT NULL,
             nonce            bigint      NOT NULL,
             state            smallint    NOT NULL,
             lease_until      timestamptz NOT NULL,
             expires_at       timestamptz NOT NULL,
             effect_committed boolean     NOT NULL DEFAULT false,
             payload          bytea,
             method           text,
             path             text,
             completed_at     timestamptz,
             waited           boolean     NOT NULL DEFAULT false
         );
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = '{table}'::regclass AND attname = 'completed_at'
                            AND NOT attisdropped) THEN
             ALTER TABLE {table}
               ADD COLUMN IF NOT EXISTS method text,
               ADD COLUMN IF NOT EXISTS path text,
               ADD COLUMN IF NOT EXISTS completed_at timestamptz;
           END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = '{table}'::regclass AND attname = 'waited'
                            AND NOT attisdropped) THEN
             ALTER TABLE {table}
               ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;
           END IF;
           {by_expiry}
           {by_fence}
         END $$;",
        by_expiry = index_if_missing(name, "expires_at", "expires_at"),
        by_fence = index_if_missing(name, "fence", "fence, key"),
    )
}

/// The PL/pgSQL that creates the index `<name>_<suffix>` on `columns` of
/// the table `name` unless an index of that name is in the table's own
/// schema (`CREATE INDEX IF NOT EXISTS` would take the table's share lock
/// first).
fn index_if_missing(name: &str, suffix: &str, columns: &str) -> String {
    let (table, index) = (quoted(name), quoted(&format!("{name}_{suffix}")));
    format!(
        "IF NOT EXISTS (SELECT 1 FROM pg_class
                          WHERE relname = '{name}_{suffix}'
                            AND relnamespace = (SELECT relnamespace FROM pg_class
                                                WHERE oid = '{table}'::regclass)) THEN
             CREATE INDEX {index} ON {table} ({columns});
           END IF;"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["idempotency_keys", "_t", "t1", &"a".repeat(MAX_TABLE_NAME)] {
            assert!(is_valid_table_name(good), "{good}");
        }
        for bad in [
            "",
            "1t",
            "Keys",
            "a-b",
            "a b",
            "t;drop table x",
            "t\"",
            "schema.t",
            "é",
            &"a".repeat(MAX_TABLE_NAME + 1),
        ] {
            assert!(!is_valid_table_name(bad), "{bad}");
        }
    }

    /// A reserved word is a valid name, so every statement must quote it:
    /// unquoted, `CREATE TABLE order (…)` and `FROM order` are syntax
    /// errors at run time.
    #[test]
    fn the_table_name_is_quoted_in_every_statement() {
        assert!(is_valid_table_name("order"));
        let s = Statements::for_table("order");
        let all = [
            &s.migrate,
            &s.claim,
            &s.complete,
            &s.release,
            &s.abandon,
            &s.extend,
            &s.probe,
            &s.purge,
            &s.fence,
            &s.cleanup,
            &s.inspect,
            &s.list,
            &s.drop_entry,
            &s.resolve,
        ];
        for sql in all {
            assert!(sql.contains("\"order\""), "{sql}");
            // Beside the quoted names, the word is only in string
            // literals: the advisory lock's, and the index names the
            // migration looks up in the catalog.
            let rest = sql
                .replace("\"order\"", "")
                .replace("\"order_expires_at\"", "")
                .replace("\"order_fence\"", "")
                .replace("'order_expires_at'", "")
                .replace("'order_fence'", "")
                .replace("'tower_idempotency_migrate:order'", "");
            assert!(!rest.contains("order"), "unquoted in: {sql}");
        }
    }
}
