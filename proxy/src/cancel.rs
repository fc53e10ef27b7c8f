//! Cancel routing and the registry of connected clients. Clients get pgwarden-issued keys
//! (a backend's own key would be useless to them, since their next transaction may run
//! elsewhere). A CancelRequest is matched to the session that holds the key and forwarded,
//! on its own short connection, to the backend serving that session at that moment, with
//! that backend's key. A session between transactions has no backend, so a cancel for it
//! does nothing.
//!
//! Behind a load balancer the cancel's connection may reach another pgwarden instance than
//! the client's: every key carries its instance's `cluster.instance_id`, and an instance
//! passes a key it does not own to its `cluster.peers` as a forwarded cancel, which the
//! owner handles and nobody passes on again.
//!
//! The same registry lists the clients for the admin console (`SHOW CLIENTS`, `SHOW
//! SERVERS`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use pgwarden_protocol::startup::{encode_cancel, encode_forwarded_cancel, CancelKey};
use rand::Rng;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::pool::Pool;

/// Time limit for forwarding one cancel.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Bits of a key's pid below the instance id.
const INSTANCE_SHIFT: u32 = 23;

/// The backend a session runs on now, and since when.
#[derive(Clone, Copy)]
pub struct Attached {
    pub addr: SocketAddr,
    pub key: CancelKey,
    pub since: SystemTime,
}

/// A client in the registry, shared by its entry and its session's handle: what the
/// console shows and the backend it runs on now (one allocation per client).
pub struct Registered {
    info: ClientInfo,
    current: Mutex<Option<Attached>>,
}

/// A connected client, as the admin console shows it.
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub pool: Arc<Pool>,
    pub principal: Option<String>,
    pub tls: bool,
    pub connected: SystemTime,
}

struct Entry {
    secret: i32,
    client: Arc<Registered>,
}

/// A client and what it runs on now (a snapshot for the console).
pub struct ClientSnapshot {
    pub key: CancelKey,
    client: Arc<Registered>,
    pub attached: Option<Attached>,
}

impl ClientSnapshot {
    pub fn info(&self) -> &ClientInfo {
        &self.client.info
    }
}

/// Clients of one pool, for the console and the per-pool gauges.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolClients {
    pub connected: usize,
    pub active: usize,
}

/// Identifies a pool in [`CancelRegistry::clients_by_pool`].
pub fn pool_id(pool: &Arc<Pool>) -> usize {
    Arc::as_ptr(pool) as usize
}

/// All live sessions' cancel keys.
pub struct CancelRegistry {
    instance_id: u8,
    sessions: Mutex<HashMap<i32, Entry>>,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        Self::new(0)
    }
}

/// What became of a CancelRequest; also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Forwarded,
    /// The session exists but holds no backend: nothing to cancel.
    Idle,
    /// No session has this key (or the secret is wrong).
    Unknown,
    Failed,
    /// The key belongs to another instance; passed to the peers.
    ToPeers,
    /// The key belongs to another instance and no peer could be reached.
    NoPeer,
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Forwarded => "forwarded",
            CancelOutcome::Idle => "idle",
            CancelOutcome::Unknown => "unknown",
            CancelOutcome::Failed => "failed",
            CancelOutcome::ToPeers => "to_peers",
            CancelOutcome::NoPeer => "no_peer",
        }
    }
}

/// A session's entry in the registry; removed on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
    client: Arc<Registered>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The instance that issued `key`.
pub fn instance_of(key: CancelKey) -> u8 {
    ((key.pid as u32) >> INSTANCE_SHIFT) as u8
}

impl CancelRegistry {
    pub fn new(instance_id: u8) -> Self {
        Self {
            instance_id,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Issues a fresh key for a new session. The pid holds the instance id above 23
    /// random bits; the secret is 32 random bits, as in Postgres.
    pub fn register(self: &Arc<Self>, info: ClientInfo) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let client = Arc::new(Registered {
            info,
            current: Mutex::new(None),
        });
        let mut sessions = lock(&self.sessions);
        // 255 << 23 still leaves the pid positive, as drivers expect.
        let high = i32::from(self.instance_id) << INSTANCE_SHIFT;
        let key = loop {
            let pid = high | rng.gen_range(1..(1 << INSTANCE_SHIFT));
            if !sessions.contains_key(&pid) {
                break CancelKey {
                    pid,
                    secret: rng.gen(),
                };
            }
        };
        sessions.insert(
            key.pid,
            Entry {
                secret: key.secret,
                client: client.clone(),
            },
        );
        CancelHandle {
            registry: self.clone(),
            key,
            client,
        }
    }

    /// Whether `key` was issued by this instance.
    pub fn owns(&self, key: CancelKey) -> bool {
        instance_of(key) == self.instance_id
    }

    /// Handles a CancelRequest carrying one of this instance's keys.
    pub async fn cancel(&self, key: CancelKey) -> CancelOutcome {
        let target = {
            let sessions = lock(&self.sessions);
            let Some(entry) = sessions.get(&key.pid) else {
                return CancelOutcome::Unknown;
            };
            if !bool::from(entry.secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes())) {
                return CancelOutcome::Unknown;
            }
            let current = *lock(&entry.client.current);
            current
        };
        let Some(attached) = target else {
            return CancelOutcome::Idle;
        };
        if forward_with_timeout(attached.addr, attached.key).await {
            CancelOutcome::Forwarded
        } else {
            CancelOutcome::Failed
        }
    }

    /// Every client and the backend it holds now.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        lock(&self.sessions)
            .iter()
            .map(|(pid, entry)| ClientSnapshot {
                key: CancelKey {
                    pid: *pid,
                    secret: 0,
                },
                client: entry.client.clone(),
                attached: *lock(&entry.client.current),
            })
            .collect()
    }

    /// Per pool (keyed by [`pool_id`]): its connected clients, and how many of them hold
    /// a backend now. One pass over the registry.
    pub fn clients_by_pool(&self) -> HashMap<usize, PoolClients> {
        let mut counts: HashMap<usize, PoolClients> = HashMap::new();
        for entry in lock(&self.sessions).values() {
            let c = counts.entry(pool_id(&entry.client.info.pool)).or_default();
            c.connected += 1;
            if lock(&entry.client.current).is_some() {
                c.active += 1;
            }
        }
        counts
    }

    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Passes a cancel for another instance's key to every peer (`host:port`, names resolved
/// now, so a DNS name that lists every instance works). The owner acts on it.
pub async fn forward_to_peers(peers: &[String], key: CancelKey) -> CancelOutcome {
    let mut packet = BytesMut::with_capacity(16);
    encode_forwarded_cancel(key, &mut packet);
    // All peers at once: one unreachable peer must not delay the cancel for the others.
    let mut sends = tokio::task::JoinSet::new();
    for peer in peers {
        let (peer, packet) = (peer.clone(), packet.clone().freeze());
        sends.spawn(async move {
            let Ok(Ok(addrs)) =
                tokio::time::timeout(FORWARD_TIMEOUT, tokio::net::lookup_host(peer.as_str())).await
            else {
                return false;
            };
            let mut reached = false;
            for addr in addrs {
                reached |= tokio::time::timeout(FORWARD_TIMEOUT, send(addr, &packet))
                    .await
                    .is_ok_and(|r| r.is_ok());
            }
            reached
        });
    }
    let mut reached = false;
    while let Some(result) = sends.join_next().await {
        reached |= result.unwrap_or(false);
    }
    if reached {
        CancelOutcome::ToPeers
    } else {
        CancelOutcome::NoPeer
    }
}

/// Sends a cancel for `key` to `addr`, giving up after a few seconds.
pub async fn forward_with_timeout(addr: SocketAddr, key: CancelKey) -> bool {
    let mut packet = BytesMut::with_capacity(16);
    encode_cancel(key, &mut packet);
    matches!(
        tokio::time::timeout(FORWARD_TIMEOUT, send(addr, &packet)).await,
        Ok(Ok(()))
    )
}

async fn send(addr: SocketAddr, packet: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(packet).await?;
    stream.shutdown().await
}

impl CancelHandle {
    /// The key given to the client in BackendKeyData.
    pub fn key(&self) -> CancelKey {
        self.key
    }

    /// Who the client is, as registered.
    pub fn info(&self) -> &ClientInfo {
        &self.client.info
    }

    /// The session now runs on the backend at `addr` with `backend_key`.
    pub fn attach(&self, addr: SocketAddr, backend_key: CancelKey) {
        *lock(&self.client.current) = Some(Attached {
            addr,
            key: backend_key,
            since: SystemTime::now(),
        });
    }

    /// The session released its backend.
    pub fn detach(&self) {
        *lock(&self.client.current) = None;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        lock(&self.registry.sessions).remove(&self.key.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of a pool of a made-up target (no connection is opened).
    fn info() -> ClientInfo {
        let config = crate::config::Config::from_toml(
            "[server]\nrequire_tls = false\n[[targets]]\nname = \"main\"\nhost = \"h\"\ncredentials = { provider = \"file\", path = \"u\" }\n",
        )
        .expect("valid config");
        let users = pgwarden_auth::FileCredentials::from_toml_str(
            "[[users]]\nname = \"u\"\npassword = \"p\"\n",
        )
        .expect("users");
        let target = crate::pool::Target::new(
            config.targets[0].clone(),
            crate::credentials::CredentialStore::from_users("main", &users).expect("store"),
            None,
            Arc::new(crate::metrics::Metrics::new()),
            tokio_util::sync::CancellationToken::new(),
        );
        ClientInfo {
            peer: "127.0.0.1:1".parse().expect("addr"),
            pool: target.pool(crate::pool::PoolKey {
                database: "d".into(),
                user: "u".into(),
            }),
            principal: None,
            tls: false,
            connected: SystemTime::now(),
        }
    }

    #[test]
    fn keys_carry_the_instance_id() {
        let registry = Arc::new(CancelRegistry::new(255));
        let handles: Vec<_> = (0..100).map(|_| registry.register(info())).collect();
        for h in &handles {
            assert!(h.key().pid > 0);
            assert_eq!(instance_of(h.key()), 255);
            assert!(registry.owns(h.key()));
        }
        let other = Arc::new(CancelRegistry::new(127));
        assert!(!other.owns(handles[0].key()));
    }

    #[tokio::test]
    async fn keys_are_unique_checked_and_removed_with_the_session() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register(info());
        let b = registry.register(info());
        assert_ne!(a.key(), b.key());
        let wrong = CancelKey {
            pid: a.key().pid,
            secret: a.key().secret.wrapping_add(1),
        };
        assert_eq!(registry.cancel(wrong).await, CancelOutcome::Unknown);
        assert_eq!(registry.cancel(a.key()).await, CancelOutcome::Idle);
        let key = a.key();
        drop(a);
        assert_eq!(registry.cancel(key).await, CancelOutcome::Unknown);
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test]
    async fn a_cancel_reaches_the_attached_backend_with_its_key() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let registry = Arc::new(CancelRegistry::default());
        let session = registry.register(info());
        let backend_key = CancelKey { pid: 42, secret: 7 };
        session.attach(addr, backend_key);
        let (outcome, received) = tokio::join!(registry.cancel(session.key()), async {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
                .await
                .expect("read");
            buf
        });
        assert_eq!(outcome, CancelOutcome::Forwarded);
        let mut expected = BytesMut::new();
        encode_cancel(backend_key, &mut expected);
        assert_eq!(received, expected.to_vec());
        session.detach();
        assert_eq!(registry.cancel(session.key()).await, CancelOutcome::Idle);
    }
}
