use super::sealed::{FenceClock, Noted, Oldest, Raw};
use super::*;

fn seen(n: u8, state: State, fence: Option<u64>) -> Inspection {
    Inspection {
        state,
        fence,
        claimed_at: fence.and_then(|f| FenceClock::Micros.time_of(f)),
        ..Inspection::nothing(&StoreKey::from_bytes([n; 32]))
    }
}

#[test]
fn keeps_the_oldest_in_the_state_asked_for() {
    let mut oldest = Oldest::new(Some(State::InFlight), 2);
    oldest.offer(seen(1, State::InFlight, Some(30)));
    oldest.offer(seen(2, State::Completed, Some(1)));
    oldest.offer(seen(3, State::InFlight, None));
    oldest.offer(seen(4, State::InFlight, Some(10)));
    oldest.offer(seen(5, State::InFlight, Some(20)));
    let fences: Vec<_> = oldest.into_sorted().iter().map(|s| s.fence).collect();
    assert_eq!(fences, [Some(10), Some(20)]);
}

#[test]
fn a_key_offered_twice_is_kept_once() {
    let mut oldest = Oldest::new(None, 10);
    oldest.offer(seen(1, State::Completed, Some(5)));
    oldest.offer(seen(1, State::Completed, Some(5)));
    oldest.offer(seen(2, State::Completed, Some(6)));
    assert_eq!(oldest.into_sorted().len(), 2);
    // A key dropped as the newest may come back.
    let mut oldest = Oldest::new(None, 1);
    oldest.offer(seen(1, State::Completed, Some(9)));
    oldest.offer(seen(2, State::Completed, Some(1)));
    oldest.offer(seen(1, State::Completed, Some(9)));
    let kept: Vec<_> = oldest.into_sorted().iter().map(|s| s.fence).collect();
    assert_eq!(kept, [Some(1)]);
}

#[test]
fn without_a_state_every_key_but_absent_ones() {
    let mut oldest = Oldest::new(None, 10);
    oldest.offer(seen(1, State::Absent, Some(1)));
    oldest.offer(seen(2, State::Unreadable, None));
    oldest.offer(seen(3, State::Completed, Some(5)));
    let states: Vec<_> = oldest.into_sorted().iter().map(|s| s.state).collect();
    assert_eq!(states, [State::Completed, State::Unreadable]);
}

#[test]
fn a_record_with_an_outcome_unknown_answer_is_outcome_unknown() {
    let key = StoreKey::from_bytes([7; 32]);
    let payload = StoredOutcome::OutcomeUnknown {
        status: StatusCode::BAD_GATEWAY,
    }
    .encode();
    let seen = Raw::Record {
        fence: Some(1_700_000_000_000_000),
        payload,
        expires_in: None,
    }
    .inspect_with(key, FenceClock::Micros, Noted::default());
    assert_eq!(seen.state, State::OutcomeUnknown);
    assert_eq!(seen.answer.map(|a| a.status), Some(StatusCode::BAD_GATEWAY));
    assert_eq!(
        seen.claimed_at,
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(1_700_000_000))
    );
    let damaged = Raw::Record {
        fence: None,
        payload: Bytes::from_static(b"not a payload"),
        expires_in: None,
    }
    .inspect_with(key, FenceClock::Micros, Noted::default());
    assert_eq!(damaged.state, State::Unreadable);
    assert!(damaged.problem.is_some());
}

#[test]
fn memory_fences_count_shards() {
    let at = FenceClock::MicrosTimes(64).time_of(64 * 1_000_000 + 3);
    assert_eq!(
        at,
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(1))
    );
    assert_eq!(FenceClock::MicrosTimes(0).time_of(5), None);
}
