//! Sender identities: interned once per stream so events carry a small id.

use std::sync::{Arc, Mutex};

/// Interned sender identity (the dnstap identity, or the peer address when it is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// Interns source names (identity, or peer address when the identity is empty) so events
/// carry a small id. Readers cache their lookups; the lock is taken once per new stream.
#[derive(Debug, Default)]
pub struct SourceRegistry {
    inner: Mutex<Interned>,
}

/// Name to id, and id (index) to name.
type Interned = (
    hashbrown::HashMap<Vec<u8>, SourceId>,
    Vec<(Arc<str>, Arc<str>)>,
);

impl SourceRegistry {
    /// The id of a source, and the version it announced (the latest one wins).
    pub fn intern(&self, name: &[u8], version: &[u8]) -> SourceId {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let version: Arc<str> = String::from_utf8_lossy(version).into();
        if let Some(&id) = g.0.get(name) {
            g.1[id.0 as usize].1 = version;
            return id;
        }
        let id = SourceId(g.1.len() as u32);
        g.1.push((String::from_utf8_lossy(name).into(), version));
        g.0.insert(name.to_vec(), id);
        id
    }

    /// (identity or peer name, version) of a source.
    pub fn describe(&self, id: SourceId) -> (Arc<str>, Arc<str>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.get(id.0 as usize)
            .cloned()
            .unwrap_or_else(|| ("".into(), "".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_id_and_the_latest_version_wins() {
        let r = SourceRegistry::default();
        let a = r.intern(b"pod-a", b"CoreDNS-1.10.1");
        let b = r.intern(b"pod-b", b"CoreDNS-1.10.1");
        assert_ne!(a, b);
        assert_eq!(r.intern(b"pod-a", b"CoreDNS-1.11.3"), a);
        assert_eq!(r.describe(a), ("pod-a".into(), "CoreDNS-1.11.3".into()));
        assert_eq!(r.describe(SourceId(99)), ("".into(), "".into()));
    }
}
