//! Pools across the VMs of one Envoy (`testing::World`): choosing by
//! priority and weight, cooldowns every worker honours, backoff.

use std::rc::Rc;

use super::*;
use crate::testing::{FakeHost, World};

fn config() -> Config {
    let json = serde_json::json!({
        "upstreams": {
            "west-ptu": {"endpoint": "acme-west", "cluster": "w", "auth": {"api_key": {"value": "k"}}},
            "west": {"endpoint": "acme-west2", "cluster": "w2", "auth": {"api_key": {"value": "k"}}},
            "east": {"endpoint": "acme-east", "cluster": "e", "auth": {"api_key": {"value": "k"}}}
        },
        "models": {"gpt-4o": {"targets": [
            {"upstream": "west-ptu", "deployment": "ptu", "priority": 0},
            {"upstream": "west", "deployment": "std", "priority": 1, "weight": 3},
            {"upstream": "east", "deployment": "std", "priority": 1, "weight": 1}
        ]}},
        "callers": [{"name": "a", "key_sha256": "0".repeat(64), "models": ["*"]}]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
}

const PTU: usize = 0;
const WEST: usize = 1;
const EAST: usize = 2;

fn model(config: &Config) -> &Model {
    config.model("gpt-4o").unwrap().1
}

#[test]
fn the_lowest_priority_gets_everything_while_it_is_open() {
    let config = config();
    let mut cooldowns = Cooldowns::new(&config, 7);
    for _ in 0..100 {
        assert_eq!(
            cooldowns.choose(model(&config), 1_000, &[]),
            Choice::Target(PTU)
        );
    }
}

#[test]
fn within_a_priority_targets_share_by_weight() {
    let config = config();
    let mut cooldowns = Cooldowns::new(&config, 11);
    let mut counts = [0usize; 3];
    for _ in 0..4_000 {
        match cooldowns.choose(model(&config), 1_000, &[PTU]) {
            Choice::Target(t) => counts[t] += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(counts[PTU], 0);
    // 3:1, within a few percent.
    let share = counts[WEST] as f64 / 4_000.0;
    assert!((0.70..0.80).contains(&share), "{counts:?}");
}

#[test]
fn a_throttled_target_is_skipped_by_every_worker_until_its_time_is_up() {
    let config = config();
    let world = World::new(1_000_000);
    let mut host_a = FakeHost::new(&world, 1);
    let host_b = FakeHost::new(&world, 1000);
    let mut a = Cooldowns::new(&config, 1);
    let mut b = Cooldowns::new(&config, 2);
    let wait = retry_after_ms(Some(b"4000"), Some(b"9000"), Some(b"60"));
    assert_eq!(wait, Some(4_000), "retry-after-ms first");
    assert_eq!(
        a.record(&mut host_a, &config, PTU, Outcome::Throttled(wait)),
        4_000
    );
    // a knows at once; b once it has read shared data (its tick).
    assert_ne!(
        a.choose(model(&config), 1_000_000, &[]),
        Choice::Target(PTU)
    );
    assert_eq!(
        b.choose(model(&config), 1_000_000, &[]),
        Choice::Target(PTU)
    );
    b.refresh(&host_b, &config);
    assert_ne!(
        b.choose(model(&config), 1_000_000, &[]),
        Choice::Target(PTU)
    );
    // Then it gets traffic again.
    world.advance(4_000);
    assert_eq!(
        a.choose(model(&config), 1_004_000, &[]),
        Choice::Target(PTU)
    );
    assert_eq!(
        b.choose(model(&config), 1_004_000, &[]),
        Choice::Target(PTU)
    );
}

#[test]
fn every_target_cooling_says_when_the_first_is_back() {
    let config = config();
    let world = World::new(0);
    let mut host = FakeHost::new(&world, 1);
    let mut cooldowns = Cooldowns::new(&config, 3);
    cooldowns.record(&mut host, &config, PTU, Outcome::Throttled(Some(30_000)));
    cooldowns.record(&mut host, &config, WEST, Outcome::Throttled(Some(8_000)));
    cooldowns.record(&mut host, &config, EAST, Outcome::Throttled(None));
    assert_eq!(
        cooldowns.choose(model(&config), 0, &[]),
        Choice::AllCooling {
            retry_after_ms: 8_000
        }
    );
    let mut chooser = PoolChooser {
        cooldowns: &mut cooldowns,
        now: 0,
    };
    let error = chooser.choose(&config, model(&config)).unwrap_err();
    assert_eq!((error.status, error.code), (429, "rate_limit_exceeded"));
    assert!(error.headers.contains(&("retry-after", "8".to_string())));
    assert!(error
        .headers
        .contains(&("retry-after-ms", "8000".to_string())));
}

#[test]
fn waits_are_bounded_and_failures_back_off() {
    let config = config();
    let world = World::new(0);
    let mut host = FakeHost::new(&world, 1);
    let mut cooldowns = Cooldowns::new(&config, 3);
    assert_eq!(
        cooldowns.record(
            &mut host,
            &config,
            PTU,
            Outcome::Throttled(Some(99_000_000))
        ),
        MAX_COOLDOWN_MS
    );
    assert_eq!(
        cooldowns.record(&mut host, &config, WEST, Outcome::Throttled(None)),
        DEFAULT_COOLDOWN_MS
    );
    let waits: Vec<u64> = (0..7)
        .map(|_| {
            let wait = cooldowns.record(&mut host, &config, EAST, Outcome::Failed);
            world.advance(wait);
            wait
        })
        .collect();
    assert_eq!(
        waits,
        vec![1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
    );
    // A success clears the backoff; the next failure starts over.
    cooldowns.record(&mut host, &config, EAST, Outcome::Served);
    assert_eq!(
        cooldowns.record(&mut host, &config, EAST, Outcome::Failed),
        1_000
    );
}

#[test]
fn a_success_with_nothing_to_clear_costs_no_host_call() {
    let config = config();
    let world = World::new(0);
    let mut host = FakeHost::new(&world, 1);
    let mut cooldowns = Cooldowns::new(&config, 3);
    cooldowns.record(&mut host, &config, PTU, Outcome::Served);
    assert!(world.shared_keys().is_empty());
}

#[test]
fn concurrent_writers_keep_the_later_cooldown() {
    let config = config();
    let world = World::new(0);
    let mut host_a = FakeHost::new(&world, 1);
    let mut host_b = FakeHost::new(&world, 2);
    let mut a = Cooldowns::new(&config, 1);
    let mut b = Cooldowns::new(&config, 2);
    a.record(&mut host_a, &config, PTU, Outcome::Throttled(Some(20_000)));
    // b had not seen a's write: its shorter cooldown must not cut a's.
    world.conflicts_to_inject.set(1);
    assert_eq!(
        b.record(&mut host_b, &config, PTU, Outcome::Throttled(Some(5_000))),
        20_000
    );
    b.refresh(&host_b, &config);
    assert!(b.is_cooling(PTU, 19_999));
    let stored = Cooldown::decode(&world.shared(&config.targets[PTU].cooldown_key).unwrap());
    assert_eq!(stored.until_ms, 20_000);
    let _ = Rc::strong_count(&world);
}

#[test]
fn the_shared_form_round_trips() {
    let cooldown = Cooldown {
        until_ms: 123,
        failures: 4,
    };
    assert_eq!(Cooldown::decode(&cooldown.encode()), cooldown);
    for junk in [&b""[..], b"cooldown/2\n1\n1", b"cooldown/1\nx\n1", b"\xff"] {
        assert_eq!(Cooldown::decode(junk), Cooldown::default());
    }
}
