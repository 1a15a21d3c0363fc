//! Which sessions become lines, and how much each line carries: `--log` (by status),
//! `--sample-succeeded` (a deterministic fraction of the Succeeded ones) and `--messages`
//! (whether the decoded messages are rendered). Every session is counted whatever is printed;
//! these only bound the log volume.

use super::LogFilter;
use crate::correlate::{Session, Status, Verdict};

/// `--messages`: which lines carry the full decoded messages. The diagnosis, the rcodes,
/// the upstream attempts and the latencies are on every line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Messages {
    #[default]
    All,
    /// Only Failed and SampleLoss lines: a Succeeded line says enough without them.
    Failed,
    None,
}

impl Messages {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "all" => Ok(Self::All),
            "failed" => Ok(Self::Failed),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown --messages value {other:?}: use all, failed or none"
            )),
        }
    }

    pub fn rendered_for(self, status: Status) -> bool {
        match self {
            Self::All => true,
            Self::Failed => status != Status::Succeeded,
            Self::None => false,
        }
    }
}

/// `--sample-succeeded`: the fraction of Succeeded sessions printed, decided per session by a
/// hash of facts that do not change between runs over the same input, so that a replay
/// prints the same sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRate {
    rate: f64,
    /// A session is kept when its hash is below this: `rate` of the u64 range.
    threshold: u64,
}

impl Default for SampleRate {
    fn default() -> Self {
        Self::ALL
    }
}

impl SampleRate {
    pub const ALL: SampleRate = SampleRate {
        rate: 1.0,
        threshold: u64::MAX,
    };

    pub fn new(rate: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!(
                "the sample rate must be between 0 and 1, got {rate}"
            ));
        }
        // 2^64 as f64 is exact; the cast saturates at u64::MAX for rate 1.
        let threshold = (rate * 18_446_744_073_709_551_616.0) as u64;
        Ok(Self { rate, threshold })
    }

    /// `0.01`, `1`, `0`: a fraction between 0 and 1.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rate: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number between 0 and 1 (e.g. 0.01)"))?;
        Self::new(rate)
    }

    pub fn rate(self) -> f64 {
        self.rate
    }

    /// Every session is kept: the lines need not say their rate.
    pub fn keeps_all(self) -> bool {
        self.rate >= 1.0
    }

    /// Whether the session with this fingerprint is in the sample.
    pub fn keeps(self, fingerprint: u64) -> bool {
        self.keeps_all() || mix(fingerprint) < self.threshold
    }
}

/// The facts that identify a session in every run over the same input: its key (sender,
/// question and, where the sender keeps it upstream, the DNS id) and the sender's time of
/// the client query (of the first message for an orphan). The wall clock, the shard and the
/// order of arrival play no part.
pub fn fingerprint(s: &Session) -> u64 {
    let time = s.cq_time().unwrap_or(s.first_time);
    s.key ^ mix(time)
}

/// SplitMix64's finalizer: every input bit flips about half of the output bits, so a
/// threshold on the result keeps a uniform fraction of the sessions.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the shards need to decide about a line, besides its layout: the rate and the
/// messages go on the line itself (see `Renderer::with_options`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LineOptions {
    pub sample_succeeded: SampleRate,
    pub messages: Messages,
}

/// Whether a finished session is printed: `--log` first, then the sample for Succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinePolicy {
    pub log: LogFilter,
    pub sample_succeeded: SampleRate,
}

impl LinePolicy {
    pub fn new(log: LogFilter, options: LineOptions) -> Self {
        Self {
            log,
            sample_succeeded: options.sample_succeeded,
        }
    }

    pub fn prints(&self, s: &Session, v: &Verdict) -> bool {
        self.log.allows(v.status)
            && (v.status != Status::Succeeded || self.sample_succeeded.keeps(fingerprint(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        for bad in ["-0.1", "1.01", "NaN", "inf", "", "1%", "abc"] {
            assert!(SampleRate::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["0", "0.01", "1", " 0.5 ", "1e-3"] {
            assert!(SampleRate::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn the_extremes_keep_everything_or_nothing() {
        let all = SampleRate::new(1.0).unwrap();
        let none = SampleRate::new(0.0).unwrap();
        for f in [0, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            assert!(all.keeps(f));
            assert!(!none.keeps(f));
        }
        assert!(all.keeps_all() && !none.keeps_all());
    }

    #[test]
    fn consecutive_fingerprints_are_kept_at_the_rate() {
        // Consecutive inputs are the worst case for a bare threshold: the mix must spread them.
        let rate = SampleRate::new(0.1).unwrap();
        let n = 100_000u64;
        let kept = (0..n).filter(|&f| rate.keeps(f)).count() as f64;
        let sigma = (n as f64 * 0.1 * 0.9).sqrt();
        assert!((kept - 10_000.0).abs() < 5.0 * sigma, "kept {kept} of {n}");
    }

    #[test]
    fn a_lower_rate_keeps_a_subset_of_a_higher_one() {
        // One threshold per rate on the same hash: lowering the rate only drops lines.
        let (low, high) = (
            SampleRate::new(0.01).unwrap(),
            SampleRate::new(0.2).unwrap(),
        );
        assert!((0..50_000u64).all(|f| !low.keeps(f) || high.keeps(f)));
    }

    #[test]
    fn messages_modes() {
        assert_eq!(Messages::parse("FAILED").unwrap(), Messages::Failed);
        assert!(Messages::parse("some").is_err());
        assert!(Messages::All.rendered_for(Status::Succeeded));
        assert!(!Messages::Failed.rendered_for(Status::Succeeded));
        assert!(Messages::Failed.rendered_for(Status::Failed));
        assert!(Messages::Failed.rendered_for(Status::SampleLoss));
        assert!(!Messages::None.rendered_for(Status::Failed));
    }
}
