//! Caller limits across the VMs of one Envoy (`testing::World`).

use std::rc::Rc;

use super::*;
use crate::testing::{FakeHost, World};

fn config(limits: serde_json::Value) -> Config {
    let json = serde_json::json!({
        "upstreams": {"west": {"endpoint": "acme-west", "cluster": "w", "auth": {"api_key": {"value": "k"}}}},
        "models": {"gpt-4o": {"upstream": "west", "deployment": "d"}},
        "callers": [
            {"name": "team-a", "key_sha256": "0".repeat(64), "models": ["*"], "limits": limits},
            {"name": "free", "key_sha256": "1".repeat(64), "models": ["*"]}
        ]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
}

fn vms(world: &Rc<World>, config: &Config, n: u32) -> Vec<FakeHost> {
    (0..n)
        .map(|i| {
            let host = FakeHost::new(world, i * 1000);
            create_windows(&host, config);
            host
        })
        .collect()
}

fn admitted(admission: Option<Admission>) -> bool {
    matches!(admission, Some(Admission::Admitted(_)))
}

#[test]
fn no_more_than_the_limit_pass_in_a_window_across_workers() {
    let config = config(serde_json::json!({"requests_per_minute": 10}));
    let world = World::new(60_000 * 1000 + 5_000);
    let mut hosts = vms(&world, &config, 3);
    let mut passed = 0;
    for round in 0..30 {
        // Writes from other workers land between one's read and its write.
        world.conflicts_to_inject.set(round % 3);
        let host = &mut hosts[round % 3];
        passed += usize::from(admitted(admit(host, &config, 0)));
    }
    assert_eq!(passed, 10);
    // The next minute starts afresh.
    world.advance(60_000);
    assert!(admitted(admit(&mut hosts[0], &config, 0)));
    // A caller without limits is not counted at all.
    assert_eq!(admit(&mut hosts[0], &config, 1), None);
}

#[test]
fn a_refusal_says_which_limit_and_when_the_window_ends() {
    let config = config(serde_json::json!({"requests_per_minute": 1, "tokens_per_minute": 100}));
    let world = World::new(60_000 * 1000 + 45_500);
    let mut host = vms(&world, &config, 1).remove(0);
    let Some(Admission::Admitted(standing)) = admit(&mut host, &config, 0) else {
        panic!("first request")
    };
    assert_eq!(
        standing.headers(),
        vec![
            ("x-ratelimit-limit-requests", "1".to_string()),
            ("x-ratelimit-remaining-requests", "0".to_string()),
            ("x-ratelimit-reset-requests", "15s".to_string()),
            ("x-ratelimit-limit-tokens", "100".to_string()),
            ("x-ratelimit-remaining-tokens", "100".to_string()),
            ("x-ratelimit-reset-tokens", "15s".to_string()),
        ]
    );
    match admit(&mut host, &config, 0) {
        Some(Admission::Limited { kind, standing }) => {
            assert_eq!(kind, Kind::Requests);
            assert_eq!(standing.reset_ms(), 14_500);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_spent_token_budget_refuses_until_the_next_window_and_overspending_carries_over() {
    let config = config(serde_json::json!({"tokens_per_minute": 100}));
    let world = World::new(60_000 * 1000);
    let mut hosts = vms(&world, &config, 2);
    assert!(admitted(admit(&mut hosts[0], &config, 0)));
    assert!(admitted(admit(&mut hosts[1], &config, 0)));
    // Both answers end: 150 tokens charged (by two workers).
    charge(&mut hosts[0], &config, 0, 90);
    charge(&mut hosts[1], &config, 0, 60);
    match admit(&mut hosts[1], &config, 0) {
        Some(Admission::Limited {
            kind: Kind::Tokens,
            standing,
        }) => {
            assert_eq!(
                standing.headers()[1],
                ("x-ratelimit-remaining-tokens", "0".to_string())
            );
        }
        other => panic!("{other:?}"),
    }
    // The next minute starts 50 tokens in: still room.
    world.advance(60_000);
    let Some(Admission::Admitted(standing)) = admit(&mut hosts[0], &config, 0) else {
        panic!("next window")
    };
    assert_eq!(standing.window.tokens, 50);
    // A minute later still, nothing is carried.
    world.advance(120_000);
    let Some(Admission::Admitted(standing)) = admit(&mut hosts[0], &config, 0) else {
        panic!("later window")
    };
    assert_eq!(standing.window.tokens, 0);
}

#[test]
fn the_shared_form_round_trips_and_durations_read_like_openais() {
    let window = Window {
        start_ms: 60_000,
        requests: 3,
        tokens: 999,
    };
    assert_eq!(Window::decode(&window.encode()), window);
    assert_eq!(Window::decode(b"limits/9\n1\n2\n3"), Window::default());
    assert_eq!(duration(20), "20ms");
    assert_eq!(duration(1_000), "1s");
    assert_eq!(duration(59_001), "1m0s");
    assert_eq!(duration(360_000), "6m0s");
}
