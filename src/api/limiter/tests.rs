//! The limiter's own tests: bursts, refills, blocks, idle sources, settings changed at run
//! time, concurrent checks and the failed-authentication throttle, on an injected clock.

#![allow(clippy::unwrap_used, clippy::panic)]
use std::sync::atomic::{AtomicI64, Ordering};

use super::*;

fn limiter(settings: SecuritySettings) -> (Limiter, Arc<AtomicI64>) {
    let now = Arc::new(AtomicI64::new(1_000_000));
    let clock = now.clone();
    (
        Limiter::new(settings, Arc::new(move || clock.load(Ordering::SeqCst))),
        now,
    )
}

#[test]
fn refuses_exactly_past_the_burst_and_refills_at_the_rate() {
    let (l, now) = limiter(SecuritySettings {
        per_client_per_second: 2.0,
        per_client_burst: 5,
        ..SecuritySettings::default()
    });
    let c = Source::Client(Uuid::nil());
    for _ in 0..5 {
        assert_eq!(l.check(c), Verdict::Allowed);
    }
    assert!(matches!(
        l.check(c),
        Verdict::Limited {
            retry_after: 1,
            audit: true
        }
    ));
    assert!(matches!(l.check(c), Verdict::Limited { audit: false, .. }));
    now.fetch_add(499, Ordering::SeqCst);
    assert!(matches!(l.check(c), Verdict::Limited { .. }));
    now.fetch_add(1, Ordering::SeqCst);
    assert_eq!(l.check(c), Verdict::Allowed);
    // Another source has its own bucket.
    assert_eq!(
        l.check(Source::Client(Uuid::from_u128(1))),
        Verdict::Allowed
    );
}

#[test]
fn extreme_stored_settings_neither_panic_nor_lift_the_limit() {
    // A rate so small, or a burst so large, that burst / rate would overflow the limiter's
    // nanosecond clock (a PUT of 2.2e-16/s once took a debug build down): clamped to the
    // validated range, and the limit still holds.
    let settings = SecuritySettings {
        per_client_per_second: 2.2e-16,
        per_client_burst: u32::MAX,
        per_ip_per_second: f64::NAN,
        per_ip_burst: 3,
        ..SecuritySettings::default()
    };
    assert!(settings.validate().is_err());
    let (l, _now) = limiter(settings);
    let c = Source::Client(Uuid::nil());
    for _ in 0..1000 {
        assert_eq!(l.check(c), Verdict::Allowed);
    }
    let ip = Source::Ip(std::net::IpAddr::from([192, 0, 2, 1]));
    for _ in 0..3 {
        assert_eq!(l.check(ip), Verdict::Allowed);
    }
    assert!(matches!(l.check(ip), Verdict::Limited { .. }));
}

#[test]
fn repeated_violations_block_for_the_period() {
    let (l, now) = limiter(SecuritySettings {
        per_ip_per_second: 1.0,
        per_ip_burst: 1,
        block_after_violations: 3,
        violation_window_secs: 60,
        block_secs: 900,
        ..SecuritySettings::default()
    });
    let ip = Source::Ip("192.0.2.1".parse().unwrap());
    assert_eq!(l.check(ip), Verdict::Allowed);
    assert!(matches!(l.check(ip), Verdict::Limited { .. }));
    assert!(matches!(l.check(ip), Verdict::Limited { .. }));
    assert_eq!(
        l.check(ip),
        Verdict::Blocked {
            retry_after: 900,
            newly: true
        }
    );
    // Blocked even though the bucket has refilled, until the period ends.
    now.fetch_add(899_000, Ordering::SeqCst);
    assert_eq!(
        l.check(ip),
        Verdict::Blocked {
            retry_after: 1,
            newly: false
        }
    );
    now.fetch_add(1_000, Ordering::SeqCst);
    assert_eq!(l.check(ip), Verdict::Allowed);
}

/// Totals over the shards: (governor states, violations, audit notes, blocks).
fn remembered(l: &Limiter) -> (usize, usize, usize, usize) {
    let policy = l.policy();
    let mut totals = (policy.per_ip.len() + policy.per_client.len(), 0, 0, 0);
    for shard in &l.books {
        let books = lock(shard);
        totals.1 += books.violations.len();
        totals.2 += books.last_audit.len();
        totals.3 += books.blocked.len();
    }
    totals
}

#[test]
fn idle_sources_are_forgotten_and_busy_ones_kept() {
    let (l, now) = limiter(SecuritySettings {
        per_ip_per_second: 1.0,
        per_ip_burst: 1,
        block_after_violations: 3,
        violation_window_secs: 60,
        block_secs: 900,
        ..SecuritySettings::default()
    });
    // A thousand sources, each refused once: a GCRA state, a violation and an audit note
    // each.
    for n in 0..1000u32 {
        let ip = Source::Ip(std::net::Ipv4Addr::from(0xc000_0200 + n).into());
        assert_eq!(l.check(ip), Verdict::Allowed);
        assert!(matches!(l.check(ip), Verdict::Limited { .. }));
    }
    l.forget_idle();
    assert_eq!(
        remembered(&l),
        (1000, 1000, 1000, 0),
        "inside the window: kept"
    );
    // Past the window, the minute and the refill, and one source busy again.
    now.fetch_add(61_000, Ordering::SeqCst);
    let busy = Source::Ip("198.51.100.7".parse().unwrap());
    assert_eq!(l.check(busy), Verdict::Allowed);
    assert!(matches!(
        l.check(busy),
        Verdict::Limited { audit: true, .. }
    ));
    l.forget_idle();
    assert_eq!(remembered(&l), (1, 1, 1, 0));
    assert!(l.books_of(&busy).violations.contains_key(&busy));
    // An ended block is forgotten too, and the count of blocks with it.
    for _ in 0..2 {
        l.check(busy);
    }
    assert_eq!(l.blocks.load(Ordering::SeqCst), 1);
    now.fetch_add(900_000, Ordering::SeqCst);
    l.forget_idle();
    assert_eq!(remembered(&l), (0, 0, 0, 0));
    assert_eq!(l.blocks.load(Ordering::SeqCst), 0);
}

#[test]
fn retry_after_is_governors_wait_rounded_up_to_whole_seconds() {
    // One request every 3 s after a burst of 2.
    let (l, now) = limiter(SecuritySettings {
        per_client_per_second: 1.0 / 3.0,
        per_client_burst: 2,
        ..SecuritySettings::default()
    });
    let c = Source::Client(Uuid::nil());
    let retry = |l: &Limiter| match l.check(c) {
        Verdict::Limited { retry_after, .. } => retry_after,
        other => panic!("not limited: {other:?}"),
    };
    assert_eq!(l.check(c), Verdict::Allowed);
    assert_eq!(l.check(c), Verdict::Allowed);
    assert_eq!(retry(&l), 3);
    now.fetch_add(1, Ordering::SeqCst);
    assert_eq!(retry(&l), 3, "2.999 s rounds up");
    now.fetch_add(1_999, Ordering::SeqCst);
    assert_eq!(retry(&l), 1);
    now.fetch_add(999, Ordering::SeqCst);
    assert_eq!(retry(&l), 1, "1 ms is still a second");
    now.fetch_add(1, Ordering::SeqCst);
    assert_eq!(l.check(c), Verdict::Allowed);
    assert_eq!(retry(&l), 3);
}

#[test]
fn settings_changed_at_run_time_govern_the_next_requests() {
    let (l, now) = limiter(SecuritySettings {
        per_ip_per_second: 0.001,
        per_ip_burst: 10,
        per_client_per_second: 0.001,
        per_client_burst: 10,
        ..SecuritySettings::default()
    });
    let ip = Source::Ip("192.0.2.1".parse().unwrap());
    let c = Source::Client(Uuid::nil());
    for _ in 0..4 {
        assert_eq!(l.check(ip), Verdict::Allowed);
        assert_eq!(l.check(c), Verdict::Allowed);
    }
    // A lower client burst: every client starts afresh with exactly the new burst...
    l.apply(SecuritySettings {
        per_client_burst: 3,
        ..(*l.settings()).clone()
    });
    for _ in 0..3 {
        assert_eq!(l.check(c), Verdict::Allowed);
    }
    assert!(matches!(l.check(c), Verdict::Limited { .. }));
    // ... and addresses, whose quota did not change, keep their state: 6 of 10 left.
    for _ in 0..6 {
        assert_eq!(l.check(ip), Verdict::Allowed);
    }
    assert!(matches!(l.check(ip), Verdict::Limited { .. }));
    // A change to something else (the block period) resets no limiter.
    l.apply(SecuritySettings {
        block_secs: 60,
        ..(*l.settings()).clone()
    });
    assert!(matches!(l.check(ip), Verdict::Limited { .. }));
    assert!(matches!(l.check(c), Verdict::Limited { .. }));
    // A faster rate: the refill follows it, and so does Retry-After.
    l.apply(SecuritySettings {
        per_client_per_second: 2.0,
        per_client_burst: 1,
        ..(*l.settings()).clone()
    });
    assert_eq!(l.check(c), Verdict::Allowed);
    assert!(matches!(
        l.check(c),
        Verdict::Limited { retry_after: 1, .. }
    ));
    now.fetch_add(499, Ordering::SeqCst);
    assert!(matches!(l.check(c), Verdict::Limited { .. }));
    now.fetch_add(1, Ordering::SeqCst);
    assert_eq!(l.check(c), Verdict::Allowed);
    // The settings read back are the ones in force.
    let settings = l.settings();
    assert_eq!((settings.per_client_burst, settings.block_secs), (1, 60));
}

#[test]
fn concurrent_checks_of_one_source_let_exactly_the_burst_through() {
    let (l, _) = limiter(SecuritySettings {
        per_client_per_second: 0.001,
        per_client_burst: 1000,
        ..SecuritySettings::default()
    });
    let l = Arc::new(l);
    let c = Source::Client(Uuid::from_u128(7));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let l = l.clone();
            std::thread::spawn(move || (0..500).filter(|_| l.check(c) == Verdict::Allowed).count())
        })
        .collect();
    let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(allowed, 1000);
}

#[test]
fn failed_authentications_delay_the_pair_then_the_source_with_a_doubling_capped_delay() {
    let (l, now) = limiter(SecuritySettings {
        auth_failures_per_client: 3,
        auth_failures_per_source: 10,
        auth_delay_max_secs: 8,
        ..SecuritySettings::default()
    });
    let (ip, other_ip): (IpAddr, IpAddr) =
        ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let victim = Some(Uuid::from_u128(1));
    // Three free failures, then 1 s, 2 s, 4 s, 8 s, 8 s.
    for _ in 0..3 {
        assert_eq!(l.auth_delay(ip, victim), None);
        assert_eq!(l.auth_failed(ip, victim), None);
    }
    let mut delays = Vec::new();
    for _ in 0..5 {
        delays.push(l.auth_failed(ip, victim).unwrap());
        assert_eq!(l.auth_delay(ip, victim), delays.last().copied());
        now.fetch_add(
            i64::try_from(*delays.last().unwrap()).unwrap() * 1000,
            Ordering::SeqCst,
        );
        assert_eq!(l.auth_delay(ip, victim), None);
    }
    assert_eq!(delays, [1, 2, 4, 8, 8]);
    // The same id from another address, and another id from this one, are not delayed.
    assert_eq!(l.auth_delay(other_ip, victim), None);
    assert_eq!(l.auth_delay(ip, Some(Uuid::from_u128(2))), None);
    // A success clears the pair; the source keeps its count.
    l.auth_succeeded(ip, victim);
    assert_eq!(l.auth_failed(ip, victim), None);
    // Nine so far from this source; its tenth is free, the eleventh delays every id.
    assert_eq!(l.auth_failed(ip, None), None);
    assert_eq!(l.auth_failed(ip, None), Some(1));
    assert!(l.auth_delay(ip, Some(Uuid::from_u128(3))).is_some());
    // A mapped IPv6 form of the address is the same source.
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
    assert!(l.auth_delay(mapped, Some(Uuid::from_u128(3))).is_some());
    // Quiet for the memory period: forgotten.
    now.fetch_add(AUTH_FAILURE_MEMORY_MS + 10_000, Ordering::SeqCst);
    l.forget_idle();
    assert!(lock(&l.auth_failures).is_empty());
    assert_eq!(l.auth_failed(ip, victim), None);
}
