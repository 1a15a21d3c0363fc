//! Basic authentication of the metrics port (`basic_auth_users` of `--metrics-web-config`).
//!
//! bcrypt is slow on purpose (cost 10: tens of milliseconds), and it runs on the one thread
//! that also answers the kubelet's probes. So a flood of bad passwords must not become a
//! flood of bcrypt runs:
//! - credentials verified once are remembered, keyed by the SHA-256 of what was presented
//!   (never the password itself): Prometheus, sending the same header every scrape, costs
//!   one bcrypt run per configuration, and so does an attacker repeating one wrong password;
//! - a bcrypt run needs credit: each peer address earns 100 ms of bcrypt per second (at most
//!   300 ms saved up), all addresses together 250 ms per second (at most 500 ms). Without
//!   credit the request is answered 429 at once. The thread thus spends at most a quarter of
//!   its time in bcrypt, and a probe waits at most the saved-up credit plus one run.

use hashbrown::{HashMap, HashSet};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Why a request was refused by client authentication; the label of
/// `dnstap_analyser_metrics_auth_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Basic` header (answered 401 with the challenge).
    NoCredentials,
    /// An unknown user or a wrong password.
    BadCredentials,
    /// New credentials while the peer (or everyone) had no bcrypt credit left: 429.
    RateLimited,
    /// `RequireAndVerifyClientCert` and the client presented no certificate: 403.
    ClientCertificate,
    /// The TLS handshake failed: plaintext on the TLS port, a client certificate the client
    /// CA does not vouch for (the connection is closed).
    TlsHandshake,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Self::NoCredentials,
        Self::BadCredentials,
        Self::RateLimited,
        Self::ClientCertificate,
        Self::TlsHandshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::BadCredentials => "bad_credentials",
            Self::RateLimited => "rate_limited",
            Self::ClientCertificate => "client_certificate",
            Self::TlsHandshake => "tls_handshake",
        }
    }
}

/// Remembered credentials of each kind; beyond it the set starts over. Bad ones are many
/// more than good ones could ever be, and never displace them.
const GOOD_REMEMBERED: usize = 64;
const BAD_REMEMBERED: usize = 4096;
/// Peer addresses whose bcrypt credit is tracked; a full table forgets the ones whose
/// credit is whole again (they lose nothing by it).
const PEERS_TRACKED: usize = 1024;
const PEER_CREDIT: Credit = Credit {
    per_second: Duration::from_millis(100),
    most: Duration::from_millis(300),
};
const ALL_CREDIT: Credit = Credit {
    per_second: Duration::from_millis(250),
    most: Duration::from_millis(500),
};

#[derive(Debug, Clone, Copy)]
struct Credit {
    per_second: Duration,
    most: Duration,
}

/// bcrypt time one may still spend, in microseconds; it goes below zero by the run that
/// used the last of it (a run's cost is only known once it is done).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    micros: i64,
    at: Instant,
}

impl Bucket {
    fn full(credit: Credit, now: Instant) -> Self {
        Self {
            micros: credit.most.as_micros() as i64,
            at: now,
        }
    }

    fn refill(&mut self, credit: Credit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let earned = (elapsed * credit.per_second.as_micros() as f64) as i64;
        self.micros = self
            .micros
            .saturating_add(earned)
            .min(credit.most.as_micros() as i64);
        self.at = now;
    }

    fn is_full(&self, credit: Credit) -> bool {
        self.micros >= credit.most.as_micros() as i64
    }
}

/// The users and what has been learned about presented credentials.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    good: HashSet<[u8; 32]>,
    bad: HashSet<[u8; 32]>,
    peers: HashMap<IpAddr, Bucket>,
    all: Bucket,
    /// bcrypt runs done, for the tests.
    #[cfg(test)]
    runs: u64,
}

impl BasicAuth {
    /// `users`: name to bcrypt hash; empty: every request is allowed.
    pub fn new(users: BTreeMap<String, String>, now: Instant) -> Self {
        Self {
            users,
            good: HashSet::new(),
            bad: HashSet::new(),
            peers: HashMap::new(),
            all: Bucket::full(ALL_CREDIT, now),
            #[cfg(test)]
            runs: 0,
        }
    }

    /// Judges the `Authorization` header of a request from `peer`.
    pub fn check(
        &mut self,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if self.users.is_empty() {
            return Ok(());
        }
        let Some(presented) = authorization.and_then(basic_credentials) else {
            return Err(Refusal::NoCredentials);
        };
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &presented)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if self.good.contains(&key) {
            return Ok(());
        }
        if self.bad.contains(&key) {
            return Err(Refusal::BadCredentials);
        }
        if !self.take_credit(peer, now) {
            return Err(Refusal::RateLimited);
        }
        let started = Instant::now();
        let good = self.verify(&presented);
        self.charge(peer, started.elapsed());
        let (set, most) = match good {
            true => (&mut self.good, GOOD_REMEMBERED),
            false => (&mut self.bad, BAD_REMEMBERED),
        };
        if set.len() >= most {
            set.clear();
        }
        set.insert(key);
        match good {
            true => Ok(()),
            false => Err(Refusal::BadCredentials),
        }
    }

    /// One bcrypt run. An unknown user is checked against another user's hash all the same,
    /// so that the answer's timing does not tell which users exist.
    fn verify(&mut self, presented: &[u8]) -> bool {
        let Some(colon) = presented.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, password) = (&presented[..colon], &presented[colon + 1..]);
        let known = std::str::from_utf8(user)
            .ok()
            .and_then(|u| self.users.get(u));
        let Some(hash) = known.or_else(|| self.users.values().next()) else {
            return false;
        };
        #[cfg(test)]
        {
            self.runs += 1;
        }
        bcrypt::verify(password, hash).unwrap_or(false) && known.is_some()
    }

    /// Whether `peer` (and everyone) may start a bcrypt run now.
    fn take_credit(&mut self, peer: Option<IpAddr>, now: Instant) -> bool {
        self.all.refill(ALL_CREDIT, now);
        if self.all.micros <= 0 {
            return false;
        }
        let Some(peer) = peer else { return true };
        if !self.peers.contains_key(&peer) && self.peers.len() >= PEERS_TRACKED {
            self.peers.retain(|_, b| {
                b.refill(PEER_CREDIT, now);
                !b.is_full(PEER_CREDIT)
            });
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= PEERS_TRACKED {
            // Every tracked address is spending: a newcomer has only the common credit.
            return true;
        }
        let bucket = self
            .peers
            .entry(peer)
            .or_insert_with(|| Bucket::full(PEER_CREDIT, now));
        bucket.refill(PEER_CREDIT, now);
        bucket.micros > 0
    }

    fn charge(&mut self, peer: Option<IpAddr>, spent: Duration) {
        let spent = spent.as_micros().min(i64::MAX as u128) as i64;
        self.all.micros = self.all.micros.saturating_sub(spent);
        if let Some(b) = peer.and_then(|p| self.peers.get_mut(&p)) {
            b.micros = b.micros.saturating_sub(spent);
        }
    }
}

/// The decoded `user:password` of `Basic <base64>`.
fn basic_credentials(header: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn header(user_password: &str) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(user_password);
        format!("Basic {b64}").into_bytes()
    }

    fn auth(now: Instant) -> BasicAuth {
        let hash = bcrypt::hash("right", 4).unwrap();
        BasicAuth::new(BTreeMap::from([("prom".to_string(), hash)]), now)
    }

    const PEER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn no_users_allows_everything() {
        let mut a = BasicAuth::new(BTreeMap::new(), Instant::now());
        assert_eq!(a.check(None, PEER, Instant::now()), Ok(()));
    }

    #[test]
    fn verified_credentials_are_remembered_good_and_bad() {
        let now = Instant::now();
        let mut a = auth(now);
        assert_eq!(a.check(None, PEER, now), Err(Refusal::NoCredentials));
        assert_eq!(
            a.check(Some(b"Bearer x"), PEER, now),
            Err(Refusal::NoCredentials)
        );
        for _ in 0..3 {
            assert_eq!(a.check(Some(&header("prom:right")), PEER, now), Ok(()));
            assert_eq!(
                a.check(Some(&header("prom:wrong")), PEER, now),
                Err(Refusal::BadCredentials)
            );
            assert_eq!(
                a.check(Some(&header("nobody:right")), PEER, now),
                Err(Refusal::BadCredentials),
                "the right password of another user is no key"
            );
        }
        assert_eq!(a.runs, 3, "one bcrypt run per distinct credentials");
    }

    #[test]
    fn a_flood_of_new_passwords_runs_out_of_credit_but_not_another_peer() {
        let now = Instant::now();
        let mut a = auth(now);
        let other = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)));
        // Pretend each run took 100 ms: the peer's 300 ms allow three.
        let mut refused = 0;
        for i in 0..10 {
            let r = a.check(Some(&header(&format!("prom:guess{i}"))), PEER, now);
            if r == Err(Refusal::RateLimited) {
                refused += 1;
            } else {
                a.charge(PEER, Duration::from_millis(100));
            }
        }
        assert_eq!(refused, 7, "three runs, then no credit");
        assert_eq!(a.check(Some(&header("prom:right")), other, now), Ok(()));
        // A second later the peer has earned 100 ms again.
        let later = now + Duration::from_secs(1);
        assert_eq!(
            a.check(Some(&header("prom:guess-late")), PEER, later),
            Err(Refusal::BadCredentials)
        );
    }
}
