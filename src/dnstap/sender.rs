//! What each DNS server is known to send (docs/senders.md), as one table of per-sender
//! traits. Supporting a new sender is one row in `PROFILES` and one `SenderProfile` variant.

use super::Nanos;

/// A sender, recognised by its dnstap version string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenderProfile {
    CoreDns,
    Unbound,
    Bind,
    KnotResolver,
    Dnsdist,
    Unknown,
}

/// What the analyser relies on in one sender's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderTraits {
    pub profile: SenderProfile,
    /// Shown in the output's `sender` field.
    pub name: &'static str,
    /// How its version string may start (ASCII, any case).
    pub version_prefixes: &'static [&'static [u8]],
    /// Copies the client's DNS id into its upstream messages, so the id can be part of the
    /// key; senders that give upstream queries fresh ids must be keyed without it.
    pub keeps_client_id: bool,
    /// Writes a session's messages in causal order (CQ, upstream pairs, CR), so anything
    /// unmatched on arrival is already evidence of loss.
    pub writes_in_order: bool,
    /// How long, at least, a query may wait for its response: waiting less than a sender's
    /// late SERVFAIL would split one request into a Failed session and an orphan response.
    pub min_session_wait: Nanos,
    /// How far a time may lie before the time it is matched against and still match.
    pub time_slack: Nanos,
}

const MS: Nanos = 1_000_000;
const S: Nanos = 1_000 * MS;
/// BIND stamps milliseconds, unbound stamps an FR before its FQ: 2 ms covers both. The other
/// senders keep the same slack, so matching stays what it was before it became a trait.
const SLACK: Nanos = 2 * MS;

/// One row per sender, in `SenderProfile` order; `Unknown` (any version) comes last.
const PROFILES: [SenderTraits; 6] = [
    SenderTraits {
        profile: SenderProfile::CoreDns,
        name: "CoreDNS",
        version_prefixes: &[b"CoreDNS-"],
        keeps_client_id: true,
        writes_in_order: true,
        min_session_wait: 0,
        time_slack: SLACK,
    },
    SenderTraits {
        profile: SenderProfile::Unbound,
        name: "unbound",
        version_prefixes: &[b"unbound"],
        keeps_client_id: false,
        writes_in_order: false,
        min_session_wait: 0,
        time_slack: SLACK,
    },
    // Answers SERVFAIL 10 s after a silent upstream; writes CR before RR.
    SenderTraits {
        profile: SenderProfile::Bind,
        name: "BIND",
        version_prefixes: &[b"BIND"],
        keeps_client_id: false,
        writes_in_order: false,
        min_session_wait: 20 * S,
        time_slack: SLACK,
    },
    // Answers SERVFAIL up to 16 s after a silent upstream.
    SenderTraits {
        profile: SenderProfile::KnotResolver,
        name: "Knot Resolver",
        // kresd 5.6 from Debian says "knot-resolver 5.6.0" (tests/fixtures/kresd).
        version_prefixes: &[b"Knot Resolver", b"knot-resolver"],
        keeps_client_id: false,
        writes_in_order: false,
        min_session_wait: 20 * S,
        time_slack: SLACK,
    },
    SenderTraits {
        profile: SenderProfile::Dnsdist,
        name: "dnsdist",
        version_prefixes: &[b"dnsdist"],
        keeps_client_id: false,
        writes_in_order: false,
        min_session_wait: 0,
        time_slack: SLACK,
    },
    // Nothing assumed: no id in the key, no loss inferred from order.
    SenderTraits {
        profile: SenderProfile::Unknown,
        name: "unknown",
        version_prefixes: &[b""],
        keeps_client_id: false,
        writes_in_order: false,
        min_session_wait: 0,
        time_slack: SLACK,
    },
];

impl SenderProfile {
    /// The first row whose prefix the version starts with (`Unknown` matches any).
    pub fn from_version(version: &[u8]) -> Self {
        let starts = |p: &[u8]| {
            version
                .get(..p.len())
                .is_some_and(|v| v.eq_ignore_ascii_case(p))
        };
        PROFILES
            .iter()
            .find(|t| t.version_prefixes.iter().any(|p| starts(p)))
            .map_or(Self::Unknown, |t| t.profile)
    }

    /// This sender's row of the table.
    pub fn traits(self) -> &'static SenderTraits {
        &PROFILES[self as usize]
    }

    pub fn upstream_keeps_client_id(self) -> bool {
        self.traits().keeps_client_id
    }

    pub fn writes_in_order(self) -> bool {
        self.traits().writes_in_order
    }

    pub fn min_session_wait(self) -> Nanos {
        self.traits().min_session_wait
    }

    pub fn time_slack(self) -> Nanos {
        self.traits().time_slack
    }

    pub fn name(self) -> &'static str {
        self.traits().name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_sits_at_its_profile_index() {
        for (i, row) in PROFILES.iter().enumerate() {
            assert_eq!(row.profile as usize, i, "{}", row.name);
            assert_eq!(row.profile.traits(), row);
        }
    }

    #[test]
    fn profiles_come_from_version_strings() {
        for (version, profile) in [
            (&b"CoreDNS-1.10.1"[..], SenderProfile::CoreDns),
            (b"unbound 1.17.1", SenderProfile::Unbound),
            (b"BIND 9.18.49", SenderProfile::Bind),
            (b"Knot Resolver 5.6.0", SenderProfile::KnotResolver),
            (b"knot-resolver 5.6.0", SenderProfile::KnotResolver),
            (b"dnsdist 1.7.3", SenderProfile::Dnsdist),
            (b"coredns-1.11.3", SenderProfile::CoreDns),
            (b"CoreDNS", SenderProfile::Unknown),
            (b"", SenderProfile::Unknown),
        ] {
            assert_eq!(SenderProfile::from_version(version), profile);
        }
    }

    #[test]
    fn only_coredns_keeps_the_id_and_writes_in_order_and_bind_and_kresd_wait_longest() {
        use SenderProfile::*;
        for p in [CoreDns, Unbound, Bind, KnotResolver, Dnsdist, Unknown] {
            assert_eq!(p.upstream_keeps_client_id(), p == CoreDns, "{p:?}");
            assert_eq!(p.writes_in_order(), p == CoreDns, "{p:?}");
            let slow = matches!(p, Bind | KnotResolver);
            assert_eq!(p.min_session_wait(), if slow { 20 * S } else { 0 }, "{p:?}");
            assert_eq!(p.time_slack(), 2 * MS, "{p:?}");
        }
    }
}
