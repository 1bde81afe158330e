use super::*;
use http::HeaderValue;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

#[test]
fn the_backoff_grows_by_its_factor_up_to_its_cap_with_full_jitter() {
    let policy =
        RetryPolicy::default().backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1));
    // The top of the jitter range: base × factor^(n−1), capped.
    let top = |n| policy.backoff_for(n, 1.0);
    assert_eq!(top(1), Duration::from_millis(100));
    assert_eq!(top(2), Duration::from_millis(200));
    assert_eq!(top(3), Duration::from_millis(400));
    assert_eq!(top(4), Duration::from_millis(800));
    assert_eq!(top(5), Duration::from_secs(1));
    assert_eq!(top(u32::MAX), Duration::from_secs(1), "no overflow");
    // Full jitter: anywhere from zero to the top.
    assert_eq!(policy.backoff_for(3, 0.0), Duration::ZERO);
    assert_eq!(policy.backoff_for(3, 0.5), Duration::from_millis(200));
}

#[test]
fn absurd_settings_saturate_instead_of_panicking() {
    let policy = RetryPolicy::default()
        .backoff(Duration::MAX, f64::INFINITY, Duration::MAX)
        .budget(Duration::ZERO, u32::MAX, f32::NAN)
        .max_attempts(0);
    assert_eq!(policy.max_attempts, 1);
    assert!(policy.backoff_for(1_000, 0.99) <= Duration::MAX);
    let policy = RetryPolicy::default().backoff(Duration::from_secs(1), -3.0, Duration::ZERO);
    assert_eq!(policy.backoff_for(7, 1.0), Duration::ZERO);
}

#[test]
fn a_backoff_capped_at_duration_max_does_not_panic() {
    // `Duration::MAX` in seconds rounds up to 2^64 as an `f64`: a
    // jitter of 1 once made `Duration::mul_f64` panic on it.
    let policy = RetryPolicy::default().backoff(Duration::from_secs(1), 1e300, Duration::MAX);
    for unit in [0.0, 0.5, 0.999_999, 1.0, f64::NAN, f64::INFINITY] {
        for retry in [1, 2, 3, 64, u32::MAX] {
            assert!(policy.backoff_for(retry, unit) <= Duration::MAX);
        }
    }
    assert_eq!(policy.backoff_for(1, 1.0), Duration::from_secs(1));
    assert_eq!(policy.backoff_for(2, 1.0), Duration::MAX);
    let exact = policy.clone().full_jitter(false);
    assert_eq!(exact.backoff_for(2, 0.5), Duration::MAX);
    let base = RetryPolicy::default().backoff(Duration::MAX, 1.0, Duration::MAX);
    assert_eq!(base.backoff_for(1, 1.0), Duration::MAX);
    assert_eq!(base.full_jitter(false).backoff_for(1, 1.0), Duration::MAX);
}

#[test]
fn retry_after_is_obeyed_up_to_its_cap() {
    let policy = RetryPolicy::default().retry_after_cap(Duration::from_secs(5));
    assert_eq!(
        policy.wait(1, Some(Duration::from_secs(2)), 0.9),
        Duration::from_secs(2)
    );
    assert_eq!(
        policy.wait(1, Some(Duration::from_secs(3600)), 0.9),
        Duration::from_secs(5)
    );
}

#[test]
fn retry_after_reads_seconds_and_http_dates() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(
        retry_after(&headers(&[("retry-after", "7")]), now),
        Some(Duration::from_secs(7))
    );
    let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
    assert_eq!(
        retry_after(&headers(&[("retry-after", &later)]), now),
        Some(Duration::from_secs(30))
    );
    let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
    assert_eq!(
        retry_after(&headers(&[("retry-after", &earlier)]), now),
        Some(Duration::ZERO)
    );
    assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
    assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn statuses_are_judged_as_the_table_says() {
    let now = SystemTime::now();
    let none = HeaderMap::new();
    for status in [429, 502, 503, 504] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(judge(status, &none, now), Verdict::Retry(None), "{status}");
    }
    for status in [200, 201, 204, 301, 400, 401, 404, 408, 413, 422, 500, 501] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(judge(status, &none, now), Verdict::Final, "{status}");
    }
    assert_eq!(
        judge(StatusCode::CONFLICT, &none, now),
        Verdict::Final,
        "a 409 that is not a problem document"
    );
    let problem = headers(&[("content-type", "application/problem+json")]);
    for status in [409, 429, 502, 503, 504] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(
            judge(status, &problem, now),
            Verdict::ReadProblem,
            "{status}"
        );
    }
    for status in [400, 422, 500] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(judge(status, &problem, now), Verdict::Final, "{status}");
    }
}

#[test]
fn only_the_in_flight_problem_is_retried() {
    let now = SystemTime::now();
    let with_wait = headers(&[("retry-after", "1")]);
    let doc = |kind: ProblemKind| {
        format!(
            r#"{{"type":"{}","title":"t","status":409}}"#,
            kind.type_uri()
        )
    };
    assert_eq!(
        judge_problem(
            StatusCode::CONFLICT,
            doc(ProblemKind::InFlight).as_bytes(),
            &with_wait,
            now
        ),
        Verdict::Retry(Some(Duration::from_secs(1)))
    );
    for kind in [
        ProblemKind::KeyMismatch,
        ProblemKind::OutcomeUnknown,
        ProblemKind::NotReplayable,
    ] {
        assert_eq!(
            judge_problem(StatusCode::CONFLICT, doc(kind).as_bytes(), &with_wait, now),
            Verdict::Final,
            "{kind:?}"
        );
    }
}

/// A problem document as the server side writes it.
fn problem_doc(kind: ProblemKind, status: StatusCode) -> String {
    format!(
        r#"{{"type":"{}","title":"{}","status":{}}}"#,
        kind.type_uri(),
        kind.title(),
        status.as_u16()
    )
}

/// The verdict on a problem document answered with `status`, as the
/// client reaches it: `judge` says to read it, `judge_problem` decides.
fn judge_refusal(status: StatusCode, body: &str, extra: &[(&str, &str)]) -> Verdict {
    let now = SystemTime::now();
    let mut pairs = vec![("content-type", "application/problem+json")];
    pairs.extend_from_slice(extra);
    let headers = headers(&pairs);
    assert_eq!(
        judge(status, &headers, now),
        Verdict::ReadProblem,
        "{status}"
    );
    judge_problem(status, body.as_bytes(), &headers, now)
}

#[test]
fn an_outcome_unknown_is_final_whatever_its_status() {
    for status in [
        StatusCode::BAD_GATEWAY,
        StatusCode::GATEWAY_TIMEOUT,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::CONFLICT,
    ] {
        let doc = problem_doc(ProblemKind::OutcomeUnknown, status);
        assert_eq!(
            judge_refusal(status, &doc, &[("retry-after", "1")]),
            Verdict::Final,
            "{status}"
        );
    }
}

#[test]
fn a_502_with_an_outcome_unknown_problem_is_final() {
    let doc = problem_doc(ProblemKind::OutcomeUnknown, StatusCode::BAD_GATEWAY);
    assert_eq!(
        judge_refusal(StatusCode::BAD_GATEWAY, &doc, &[]),
        Verdict::Final
    );
}

#[test]
fn a_504_with_an_outcome_unknown_problem_is_final() {
    let doc = problem_doc(ProblemKind::OutcomeUnknown, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        judge_refusal(StatusCode::GATEWAY_TIMEOUT, &doc, &[]),
        Verdict::Final
    );
}

#[test]
fn a_503_with_a_store_unavailable_problem_is_retried_after_retry_after() {
    let doc = problem_doc(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(
        judge_refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            &doc,
            &[("retry-after", "2")]
        ),
        Verdict::Retry(Some(Duration::from_secs(2)))
    );
}

#[test]
fn other_problem_types_leave_the_verdict_to_the_status() {
    let doc = problem_doc(ProblemKind::KeyMismatch, StatusCode::CONFLICT);
    for status in [429, 502, 503, 504] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(
            judge_refusal(status, &doc, &[]),
            Verdict::Retry(None),
            "{status}"
        );
    }
    assert_eq!(
        judge_refusal(StatusCode::CONFLICT, &doc, &[]),
        Verdict::Final
    );
    // Not a problem document of this crate at all.
    assert_eq!(
        judge_refusal(StatusCode::BAD_GATEWAY, "{}", &[]),
        Verdict::Retry(None)
    );
}

#[test]
fn a_502_without_a_problem_document_is_retried() {
    let now = SystemTime::now();
    let html = headers(&[("content-type", "text/html")]);
    assert_eq!(
        judge(StatusCode::BAD_GATEWAY, &html, now),
        Verdict::Retry(None)
    );
    assert_eq!(
        judge(StatusCode::BAD_GATEWAY, &HeaderMap::new(), now),
        Verdict::Retry(None)
    );
}

#[test]
fn a_409_in_flight_is_retried_after_retry_after() {
    let doc = problem_doc(ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(
        judge_refusal(StatusCode::CONFLICT, &doc, &[("retry-after", "1")]),
        Verdict::Retry(Some(Duration::from_secs(1)))
    );
    assert_eq!(
        judge_refusal(StatusCode::CONFLICT, &doc, &[]),
        Verdict::Retry(None)
    );
}

#[test]
fn grpc_statuses_are_judged_by_grpc_status_and_pushback() {
    let now = SystemTime::now();
    let grpc = |status: &str, pushback: Option<&str>| {
        let mut pairs = vec![
            ("content-type", "application/grpc"),
            ("grpc-status", status),
        ];
        if let Some(p) = pushback {
            pairs.push(("grpc-retry-pushback-ms", p));
        }
        judge(StatusCode::OK, &headers(&pairs), now)
    };
    assert_eq!(grpc("14", None), Verdict::Retry(None), "UNAVAILABLE");
    assert_eq!(
        grpc("10", None),
        Verdict::Retry(None),
        "ABORTED (in flight)"
    );
    assert_eq!(grpc("8", None), Verdict::Retry(None), "RESOURCE_EXHAUSTED");
    assert_eq!(
        grpc("14", Some("250")),
        Verdict::Retry(Some(Duration::from_millis(250)))
    );
    assert_eq!(grpc("14", Some("-1")), Verdict::Final, "pushback says no");
    for code in ["0", "2", "3", "9", "13", "16"] {
        assert_eq!(grpc(code, None), Verdict::Final, "{code}");
    }
    // A response whose status comes in trailers (after messages).
    let streaming = headers(&[("content-type", "application/grpc")]);
    assert_eq!(judge(StatusCode::OK, &streaming, now), Verdict::Final);
}

#[test]
fn methods_outside_the_list_are_not_retried() {
    let policy = RetryPolicy::default();
    assert!(policy.allows(&Method::POST));
    assert!(!policy.allows(&Method::CONNECT));
    let policy = policy.methods([Method::POST]);
    assert!(!policy.allows(&Method::GET));
}

#[test]
fn the_budget_is_shared_and_runs_out() {
    let policy = RetryPolicy::default().budget(Duration::from_secs(1), 0, 0.0);
    let clone = policy.clone();
    // No deposits, no minimum: nothing to withdraw, on any clone.
    assert!(!policy.withdraw());
    assert!(!clone.withdraw());
    let generous = RetryPolicy::default().budget(Duration::from_secs(10), 0, 1.0);
    for _ in 0..10 {
        generous.deposit();
    }
    let shared = generous.clone();
    let mut taken = 0;
    while shared.withdraw() && taken < 100 {
        taken += 1;
    }
    assert!((1..=10).contains(&taken), "{taken}");
    assert!(!generous.withdraw(), "the clones share one budget");
}
