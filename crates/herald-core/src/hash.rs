//! A deterministic hash for identifiers shared across processes (advisory lock
//! ids). Rust's `DefaultHasher` is seeded per process, so two instances would
//! disagree on the lock id (seed 001 §5); FNV-1a is fixed forever.

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// An advisory lock id for `name`, stable across processes, machines and
/// releases.
pub fn advisory_lock_id(name: &str) -> i64 {
    i64::from_ne_bytes(fnv1a64(name.as_bytes()).to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn lock_ids_are_stable() {
        assert_eq!(advisory_lock_id("herald:install"), advisory_lock_id("herald:install"));
        assert_ne!(advisory_lock_id("herald:install"), advisory_lock_id("herald:doorbell"));
    }
}
