//! A model-based property test: random operation sequences against
//! `MemoryStore` and a plain reference model must give the same answers.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{
    Claim, CompletedRecord, LeaseStatus, MemoryStore, OwnerToken, Store,
};

const LEASE_MS: u64 = 100;
const RETENTION_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    Claim { key: u8, fp: u8 },
    // `token` indexes the tokens granted so far (modulo their number).
    Complete { key: u8, token: usize, payload: u8 },
    Release { key: u8, token: usize },
    Extend { key: u8, token: usize },
    Purge { key: u8 },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..3;
    prop_oneof![
        3 => (key.clone(), 0u8..2).prop_map(|(key, fp)| Op::Claim { key, fp }),
        2 => (key.clone(), any::<usize>(), any::<u8>()).prop_map(|(key, token, payload)| Op::Complete { key, token, payload }),
        1 => (key.clone(), any::<usize>()).prop_map(|(key, token)| Op::Release { key, token }),
        1 => (key.clone(), any::<usize>()).prop_map(|(key, token)| Op::Extend { key, token }),
        1 => key.prop_map(|key| Op::Purge { key }),
        2 => prop_oneof![Just(30u64), Just(70), Just(150), Just(1_200)].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The reference: what each key holds, in plain data.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    InFlight {
        token: usize,
        fp: u8,
        deadline: u64,
    },
    Done {
        fp: u8,
        payload: u8,
        owner: usize,
        expires: u64,
    },
}

#[derive(Debug, Default)]
struct Model {
    now: u64,
    slots: HashMap<u8, Slot>,
}

/// What an operation answered, in terms both sides can produce.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Acquired,
    InFlight { fp: u8 },
    Completed { fp: u8, payload: u8 },
    Status(LeaseStatus),
    Purged(bool),
    Advanced,
}

impl Model {
    fn live(&self, key: u8) -> Option<&Slot> {
        match self.slots.get(&key) {
            Some(s @ Slot::InFlight { deadline, .. }) if *deadline > self.now => Some(s),
            Some(s @ Slot::Done { expires, .. }) if *expires > self.now => Some(s),
            _ => None,
        }
    }

    fn apply(&mut self, op: &Op, granted: usize) -> Answer {
        match *op {
            Op::Claim { key, fp } => match self.live(key) {
                Some(Slot::InFlight { fp, .. }) => Answer::InFlight { fp: *fp },
                Some(Slot::Done { fp, payload, .. }) => Answer::Completed {
                    fp: *fp,
                    payload: *payload,
                },
                None => {
                    self.slots.insert(
                        key,
                        Slot::InFlight {
                            token: granted,
                            fp,
                            deadline: self.now + LEASE_MS,
                        },
                    );
                    Answer::Acquired
                }
            },
            Op::Complete {
                key,
                token,
                payload,
            } => {
                let token = pick(token, granted);
                // A claim completes after its lease too, while nobody took
                // it over (a takeover replaces the slot and its token).
                let slot = match self.slots.get(&key) {
                    Some(s @ Slot::InFlight { .. }) => Some(s.clone()),
                    _ => self.live(key).cloned(),
                };
                match slot {
                    Some(Slot::InFlight { token: t, fp, .. }) if Some(t) == token => {
                        self.slots.insert(
                            key,
                            Slot::Done {
                                fp,
                                payload,
                                owner: t,
                                expires: self.now + RETENTION_MS,
                            },
                        );
                        Answer::Status(LeaseStatus::Held)
                    }
                    Some(Slot::Done { owner, .. }) if Some(owner) == token => {
                        Answer::Status(LeaseStatus::Held)
                    }
                    _ => Answer::Status(LeaseStatus::Lost),
                }
            }
            Op::Release { key, token } => {
                let token = pick(token, granted);
                match self.slots.get(&key).cloned() {
                    Some(Slot::InFlight {
                        token: t, deadline, ..
                    }) if Some(t) == token => {
                        self.slots.remove(&key);
                        Answer::Status(if deadline > self.now {
                            LeaseStatus::Held
                        } else {
                            LeaseStatus::Lost
                        })
                    }
                    _ => Answer::Status(LeaseStatus::Lost),
                }
            }
            Op::Extend { key, token } => {
                let token = pick(token, granted);
                let now = self.now;
                match self.slots.get_mut(&key) {
                    Some(Slot::InFlight {
                        token: t, deadline, ..
                    }) if Some(*t) == token && *deadline > now => {
                        *deadline = now + LEASE_MS;
                        Answer::Status(LeaseStatus::Held)
                    }
                    _ => Answer::Status(LeaseStatus::Lost),
                }
            }
            Op::Purge { key } => {
                let had = match self.slots.remove(&key) {
                    Some(Slot::InFlight { deadline, .. }) => deadline > self.now,
                    Some(Slot::Done { expires, .. }) => expires > self.now,
                    None => false,
                };
                Answer::Purged(had)
            }
            Op::Advance { ms } => {
                self.now += ms;
                Answer::Advanced
            }
        }
    }
}

fn pick(index: usize, granted: usize) -> Option<usize> {
    (granted > 0).then(|| index % granted)
}

fn store_key(key: u8) -> StoreKey {
    StoreKey::from_parts(b"model", &[key])
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// Runs `op` on the store; `record_fp` is the fingerprint a completion
/// stores (the one the key was claimed with, which the caller knows).
async fn run_real(
    store: &MemoryStore,
    op: &Op,
    record_fp: u8,
    tokens: &mut Vec<OwnerToken>,
) -> Answer {
    let lease = Duration::from_millis(LEASE_MS);
    let retention = Duration::from_millis(RETENTION_MS);
    let token = |index: usize| (!tokens.is_empty()).then(|| tokens[index % tokens.len()]);
    // A token nobody was granted, for operations before any grant.
    let nobody = OwnerToken::new(u64::MAX, 0);
    match *op {
        Op::Claim { key, fp: f } => {
            match store.claim(store_key(key), fp(f), lease).await.unwrap() {
                Claim::Acquired(t) => {
                    tokens.push(t);
                    Answer::Acquired
                }
                Claim::InFlight { fingerprint, .. } => Answer::InFlight {
                    fp: fingerprint.as_bytes()[0],
                },
                Claim::Completed(rec) => Answer::Completed {
                    fp: rec.fingerprint.as_bytes()[0],
                    payload: rec.payload[0],
                },
                other => panic!("unexpected claim {other:?}"),
            }
        }
        Op::Complete {
            key,
            token: i,
            payload,
        } => {
            let t = token(i).unwrap_or(nobody);
            let rec = CompletedRecord {
                fingerprint: fp(record_fp),
                payload: Bytes::from(vec![payload]),
            };
            Answer::Status(
                store
                    .complete(store_key(key), t, rec, retention)
                    .await
                    .unwrap(),
            )
        }
        Op::Release { key, token: i } => Answer::Status(
            store
                .release(store_key(key), token(i).unwrap_or(nobody))
                .await
                .unwrap(),
        ),
        Op::Extend { key, token: i } => Answer::Status(
            store
                .extend(store_key(key), token(i).unwrap_or(nobody), lease)
                .await
                .unwrap(),
        ),
        Op::Purge { key } => Answer::Purged(store.purge(store_key(key)).await.unwrap()),
        Op::Advance { ms } => {
            tokio::time::advance(Duration::from_millis(ms)).await;
            Answer::Advanced
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::new();
            let mut model = Model::default();
            let mut tokens = Vec::new();
            for (step, op) in ops.iter().enumerate() {
                let record_fp = match op {
                    Op::Complete { key, .. } => match model.slots.get(key) {
                        Some(Slot::InFlight { fp, .. }) => *fp,
                        _ => 0,
                    },
                    _ => 0,
                };
                let expected = model.apply(op, tokens.len());
                let actual = run_real(&store, op, record_fp, &mut tokens).await;
                prop_assert_eq!(&actual, &expected, "step {} ({:?}) of {:?}", step, op, ops);
            }
            Ok(())
        })?;
    }
}
