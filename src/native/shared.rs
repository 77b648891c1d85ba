//! Data every worker sees: in Wasm it is Envoy's shared data (one store per
//! `vm_id`); a native module is one copy in the process, so it is process
//! memory behind a mutex, with the same versioned compare-and-swap.
//!
//! Semantics kept from Envoy's proxy-wasm shared data: every write takes a
//! new version from one counter (never 0); a write with `cas` 0 always
//! succeeds, else only while the value is still at version `cas`; a key
//! that does not exist yet is written whatever `cas` says.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::host_api::Write;

#[derive(Default)]
struct Data {
    values: HashMap<String, (Vec<u8>, u32)>,
    last_version: u32,
}

impl Data {
    fn next_version(&mut self) -> u32 {
        self.last_version = self.last_version.wrapping_add(1).max(1);
        self.last_version
    }
}

type Store = Mutex<Data>;

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| Mutex::new(Data::default()))
}

pub fn get(key: &str) -> Option<(Vec<u8>, u32)> {
    // A panic elsewhere while the lock was held leaves a consistent map
    // (each write is one insert), so a poisoned lock is used as is.
    let data = store().lock().unwrap_or_else(|e| e.into_inner());
    data.values.get(key).cloned()
}

pub fn set(key: &str, value: &[u8], cas: u32) -> Write {
    let mut data = store().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, version)) = data.values.get(key) {
        if cas != 0 && cas != *version {
            return Write::Conflict;
        }
    }
    let version = data.next_version();
    data.values
        .insert(key.to_string(), (value.to_vec(), version));
    Write::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_compare_and_swap() {
        let key = "native-shared-test";
        assert_eq!(get(key), None);
        assert_eq!(set(key, b"a", 7), Write::Done);
        let (value, first) = get(key).unwrap_or_default();
        assert_eq!(value, b"a");
        assert_ne!(first, 0);
        assert_eq!(set(key, b"b", first.wrapping_add(1)), Write::Conflict);
        assert_eq!(set(key, b"b", first), Write::Done);
        let (value, second) = get(key).unwrap_or_default();
        assert_eq!(value, b"b");
        assert_ne!(second, first);
        assert_eq!(set(key, b"c", first), Write::Conflict);
        assert_eq!(set(key, b"c", 0), Write::Done);
        assert_eq!(get(key).map(|(v, _)| v), Some(b"c".to_vec()));
    }
}
