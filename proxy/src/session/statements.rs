//! Named prepared statements in transaction mode, without pinning.
//!
//! A client's statement name is mapped to a backend-wide name derived from the statement
//! itself (`pgw_` + a hash of its query text and parameter types), so clients that prepare
//! the same statement share one backend statement, and any backend can serve any client:
//! a backend that has not seen a statement gets its Parse injected just before use.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::frontend;
use sha2::{Digest, Sha256};

/// Most distinct statements one backend keeps prepared; the least recently used beyond
/// that is closed on the backend (and re-prepared if used again).
pub const BACKEND_STATEMENT_CAPACITY: usize = 512;

/// Most named statements one client may hold at once.
pub const CLIENT_STATEMENT_LIMIT: usize = 10_000;

/// A client's named statement as the backend knows it.
#[derive(Debug)]
pub struct Prepared {
    /// The backend-wide name.
    pub name: Arc<str>,
    /// The complete Parse message that prepares it under that name.
    pub parse: Bytes,
}

impl Prepared {
    /// Builds the backend statement for a client Parse body whose text after the name is
    /// `rest` (query text and parameter types).
    pub fn from_parse_rest(rest: &[u8]) -> Self {
        let digest = Sha256::digest(rest);
        let mut name = String::with_capacity(4 + 32);
        name.push_str("pgw_");
        for byte in &digest[..16] {
            name.push_str(&format!("{byte:02x}"));
        }
        let mut parse = BytesMut::with_capacity(rest.len() + name.len() + 6);
        frontend::parse(&mut parse, &name, rest);
        Self {
            name: name.into(),
            parse: parse.freeze(),
        }
    }
}

/// One client's named statements, by client name. Boxed on first use: most clients never
/// name a statement, and every parked client carries this.
#[derive(Default)]
pub struct ClientStatements {
    #[allow(
        clippy::box_collection,
        reason = "8 bytes in every client instead of a HashMap's 48; one allocation more for the few that prepare"
    )]
    by_name: Option<Box<HashMap<String, Arc<Prepared>>>>,
}

impl ClientStatements {
    pub fn get(&self, client_name: &str) -> Option<&Arc<Prepared>> {
        self.by_name.as_ref()?.get(client_name)
    }

    /// Records a statement; false if the client already holds too many.
    pub fn insert(&mut self, client_name: &str, prepared: Arc<Prepared>) -> bool {
        let by_name = self.by_name.get_or_insert_default();
        if by_name.len() >= CLIENT_STATEMENT_LIMIT && !by_name.contains_key(client_name) {
            return false;
        }
        by_name.insert(client_name.to_owned(), prepared);
        true
    }

    pub fn remove(&mut self, client_name: &str) -> Option<Arc<Prepared>> {
        self.by_name.as_mut()?.remove(client_name)
    }

    /// Forgets `client_name` only if it still names `backend_name` (a Parse that failed).
    pub fn forget_if(&mut self, client_name: &str, backend_name: &str) {
        if self
            .get(client_name)
            .is_some_and(|p| &*p.name == backend_name)
        {
            self.remove(client_name);
        }
    }

    pub fn clear(&mut self) {
        self.by_name = None;
    }

    pub fn len(&self) -> usize {
        self.by_name.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Statements prepared on one backend connection, least recently used first out.
#[derive(Debug, Default)]
pub struct BackendStatements {
    /// Backend name → (last use, stale). A stale statement must be closed and prepared
    /// again (after `cached plan must not change result type`).
    names: HashMap<Arc<str>, (u64, bool)>,
    tick: u64,
}

/// Whether a statement is ready on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Missing,
    Stale,
}

impl BackendStatements {
    pub fn readiness(&self, name: &str) -> Readiness {
        match self.names.get(name) {
            Some((_, false)) => Readiness::Ready,
            Some((_, true)) => Readiness::Stale,
            None => Readiness::Missing,
        }
    }

    /// Marks a use, for the LRU order.
    pub fn touch(&mut self, name: &str) {
        self.tick += 1;
        if let Some(entry) = self.names.get_mut(name) {
            entry.0 = self.tick;
        }
    }

    /// Records that `name` is (about to be) prepared; returns the statement to close first
    /// when the backend is at capacity.
    pub fn insert(&mut self, name: Arc<str>) -> Option<Arc<str>> {
        self.tick += 1;
        let evicted =
            if self.names.len() >= BACKEND_STATEMENT_CAPACITY && !self.names.contains_key(&name) {
                let oldest = self
                    .names
                    .iter()
                    .min_by_key(|(_, (tick, _))| *tick)
                    .map(|(n, _)| n.clone());
                if let Some(n) = &oldest {
                    self.names.remove(n);
                }
                oldest
            } else {
                None
            };
        self.names.insert(name, (self.tick, false));
        evicted
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn mark_stale(&mut self, name: &str) {
        if let Some(entry) = self.names.get_mut(name) {
            entry.1 = true;
        }
    }

    /// The backend ran `DISCARD ALL` or `DEALLOCATE ALL`: nothing is prepared any more.
    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_and_types_share_a_backend_name_and_others_do_not() {
        let a = Prepared::from_parse_rest(b"select $1\0\0\x01\0\0\0\x17");
        let b = Prepared::from_parse_rest(b"select $1\0\0\x01\0\0\0\x17");
        let c = Prepared::from_parse_rest(b"select $1\0\0\x01\0\0\0\x19");
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
        assert!(a.name.starts_with("pgw_") && a.name.len() == 36);
        assert!(a.parse.starts_with(b"P"));
    }

    #[test]
    fn backend_statements_evict_the_least_recently_used() {
        let mut set = BackendStatements::default();
        let names: Vec<Arc<str>> = (0..BACKEND_STATEMENT_CAPACITY)
            .map(|i| Arc::from(format!("s{i}")))
            .collect();
        for n in &names {
            assert_eq!(set.insert(n.clone()), None);
        }
        set.touch("s0");
        let evicted = set.insert(Arc::from("new"));
        assert_eq!(evicted.as_deref(), Some("s1"));
        assert_eq!(set.readiness("s1"), Readiness::Missing);
        assert_eq!(set.readiness("s0"), Readiness::Ready);
        set.mark_stale("s0");
        assert_eq!(set.readiness("s0"), Readiness::Stale);
        assert_eq!(set.len(), BACKEND_STATEMENT_CAPACITY);
    }

    #[test]
    fn a_failed_parse_is_forgotten_only_if_the_name_was_not_redefined() {
        let mut client = ClientStatements::default();
        let p1 = Arc::new(Prepared::from_parse_rest(b"select 1\0\0\0"));
        let p2 = Arc::new(Prepared::from_parse_rest(b"select 2\0\0\0"));
        client.insert("s", p1.clone());
        client.insert("s", p2.clone());
        client.forget_if("s", &p1.name);
        assert!(client.get("s").is_some());
        client.forget_if("s", &p2.name);
        assert!(client.get("s").is_none());
    }
}
