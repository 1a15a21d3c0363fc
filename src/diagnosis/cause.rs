//! Why a session ended the way it did, and how an upstream attempt ended: the one definition
//! the line's `cause`, the metrics' `cause` label and `/top` share.

use crate::correlate::{BitMap, LossReason, Status, Verdict};
use crate::dnstap::Role;

/// Why a session ended the way it did. See [`Cause::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Succeeded without an upstream leg (cache, zone file, rewrite...).
    LocalAnswer,
    /// Succeeded with an answer from an upstream.
    ForwardedAnswer,
    /// Failed, and no upstream attempt was answered.
    UpstreamTimeout,
    /// Failed, and an upstream answered with an error rcode.
    UpstreamError,
    /// Failed with an error rcode answered locally, replaying an upstream's answer with the
    /// same rcode for the same question within the cache window (CoreDNS's `cache`).
    CachedUpstreamError,
    /// Failed with an error rcode to the client that no upstream error explains.
    ServerError,
    /// Failed with only the client query seen, while the sender's upstream attempts were
    /// failing: most likely REFUSED by `forward`'s `max_concurrent`, outside the tap.
    RejectedUpstreamFailing,
    /// Failed without any response to the client and without a timed-out upstream leg.
    NoResponse,
    /// SampleLoss because the sender (CoreDNS) lost messages.
    SenderLoss,
    /// SampleLoss because this analyser dropped messages or evicted the session.
    AnalyserLoss,
}

/// What the stream showed before a session's client message (see `diagnosis::recall`), as
/// far as the cause goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recalled {
    Nothing,
    /// The same question had an upstream answer with this rcode within the cache window.
    UpstreamRcode(u8),
    /// The sender's upstream attempts were failing within the window.
    UpstreamFailing,
}

impl Cause {
    pub const ALL: [Cause; 10] = [
        Cause::LocalAnswer,
        Cause::ForwardedAnswer,
        Cause::UpstreamTimeout,
        Cause::UpstreamError,
        Cause::CachedUpstreamError,
        Cause::ServerError,
        Cause::RejectedUpstreamFailing,
        Cause::NoResponse,
        Cause::SenderLoss,
        Cause::AnalyserLoss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::LocalAnswer => "local_answer",
            Self::ForwardedAnswer => "forwarded_answer",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamError => "upstream_error",
            Self::CachedUpstreamError => "cached_upstream_error",
            Self::ServerError => "server_error",
            Self::RejectedUpstreamFailing => "rejected_upstream_failing",
            Self::NoResponse => "no_response",
            Self::SenderLoss => "sender_loss",
            Self::AnalyserLoss => "analyser_loss",
        }
    }

    /// Classifies a finished session from its verdict, the outcomes of its upstream attempts
    /// and what the stream showed before it. SampleLoss is never a DNS failure: it is
    /// `analyser_loss` when this analyser lost data (queue full, session table full) and
    /// `sender_loss` otherwise. A Failed session is blamed on the most specific evidence
    /// first: an upstream error rcode, then upstream attempts of which none was answered, then
    /// a local error answer replaying a recent upstream error (cache), then an error rcode of
    /// the server itself; without any response, a failing upstream (queries refused while
    /// they pile up), and finally the lack of any response.
    ///
    /// When the caller knows no attempts (no wire data), the bitmap stands in: an FQ without
    /// any FR counts as unanswered upstream attempts, an FR as an answer.
    pub fn of(
        verdict: &Verdict,
        attempts: AttemptSummary,
        client_rcode: Option<u8>,
        recalled: Recalled,
    ) -> Cause {
        let bitmap = verdict.bitmap;
        let upstream_leg = attempts.total() > 0
            || bitmap.has(Role::UpstreamQuery)
            || bitmap.has(Role::UpstreamResponse);
        let some_answered = if attempts.total() > 0 {
            attempts.answered + attempts.error_rcode > 0
        } else {
            bitmap.has(Role::UpstreamResponse)
        };
        let replayed = matches!(recalled, Recalled::UpstreamRcode(r) if Some(r) == client_rcode);
        match verdict.status {
            Status::SampleLoss => match verdict.loss {
                Some(LossReason::AnalyserQueueFull | LossReason::SessionTableFull) => {
                    Cause::AnalyserLoss
                }
                _ => Cause::SenderLoss,
            },
            Status::Succeeded if upstream_leg => Cause::ForwardedAnswer,
            Status::Succeeded => Cause::LocalAnswer,
            Status::Failed if attempts.error_rcode > 0 => Cause::UpstreamError,
            Status::Failed if upstream_leg && !some_answered => Cause::UpstreamTimeout,
            Status::Failed if !upstream_leg && replayed => Cause::CachedUpstreamError,
            Status::Failed if bitmap.has(Role::ClientResponse) => Cause::ServerError,
            Status::Failed if bitmap == BitMap::CQ && recalled == Recalled::UpstreamFailing => {
                Cause::RejectedUpstreamFailing
            }
            // Bitmap 1, or an upstream answered but the client never got a response.
            Status::Failed => Cause::NoResponse,
        }
    }
}

/// The `outcome` label of `upstream_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttemptOutcome {
    Answered,
    Timeout,
    ErrorRcode,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 3] = [Self::Answered, Self::Timeout, Self::ErrorRcode];

    pub fn name(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Timeout => "timeout",
            Self::ErrorRcode => "error_rcode",
        }
    }

    /// An attempt without a response timed out; NOERROR and NXDOMAIN are answers (as in
    /// `Session::verdict`), as is a response without wire data; other rcodes are errors.
    pub fn of(answered: bool, rcode: Option<u16>) -> Self {
        match (answered, rcode) {
            (false, _) => Self::Timeout,
            (true, None | Some(0 | 3)) => Self::Answered,
            (true, Some(_)) => Self::ErrorRcode,
        }
    }
}

/// How many attempts of a session ended each way; the input of [`Cause::of`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptSummary {
    pub answered: u32,
    pub timeout: u32,
    pub error_rcode: u32,
}

impl AttemptSummary {
    pub fn add(&mut self, outcome: AttemptOutcome) {
        match outcome {
            AttemptOutcome::Answered => self.answered += 1,
            AttemptOutcome::Timeout => self.timeout += 1,
            AttemptOutcome::ErrorRcode => self.error_rcode += 1,
        }
    }

    pub fn total(&self) -> u32 {
        self.answered + self.timeout + self.error_rcode
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A verdict with no `incomplete` (tests of its consumers too).
    pub(crate) fn verdict(status: Status, bitmap: u8, loss: Option<LossReason>) -> Verdict {
        Verdict {
            status,
            bitmap: BitMap(bitmap),
            loss,
            incomplete: None,
        }
    }

    fn summary(outcomes: &[AttemptOutcome]) -> AttemptSummary {
        let mut s = AttemptSummary::default();
        for &o in outcomes {
            s.add(o);
        }
        s
    }

    use AttemptOutcome::*;

    #[test]
    fn successes_split_by_upstream_leg() {
        let none = AttemptSummary::default();
        let v = verdict(Status::Succeeded, 3, None);
        assert_eq!(
            Cause::of(&v, none, None, Recalled::Nothing),
            Cause::LocalAnswer
        );
        let v = verdict(Status::Succeeded, 15, None);
        assert_eq!(
            Cause::of(&v, summary(&[Answered]), None, Recalled::Nothing),
            Cause::ForwardedAnswer
        );
        // Known from the bitmap alone when no attempts were given.
        assert_eq!(
            Cause::of(&v, none, None, Recalled::Nothing),
            Cause::ForwardedAnswer
        );
    }

    #[test]
    fn failures_blame_the_most_specific_evidence() {
        let none = AttemptSummary::default();
        // CQ + FQ, nothing answered: the upstream timed out.
        let v = verdict(Status::Failed, 5, None);
        assert_eq!(
            Cause::of(&v, summary(&[Timeout]), None, Recalled::Nothing),
            Cause::UpstreamTimeout
        );
        assert_eq!(
            Cause::of(&v, none, None, Recalled::Nothing),
            Cause::UpstreamTimeout
        );
        // SERVFAIL to the client after every attempt timed out is still the upstream's doing.
        let v = verdict(Status::Failed, 7, None);
        assert_eq!(
            Cause::of(&v, summary(&[Timeout, Timeout]), None, Recalled::Nothing),
            Cause::UpstreamTimeout
        );
        // An upstream error rcode wins over timeouts of other attempts.
        let v = verdict(Status::Failed, 15, None);
        assert_eq!(
            Cause::of(&v, summary(&[Timeout, ErrorRcode]), None, Recalled::Nothing),
            Cause::UpstreamError
        );
        // The upstream answered fine but the client got an error: the server's own.
        assert_eq!(
            Cause::of(&v, summary(&[Answered]), None, Recalled::Nothing),
            Cause::ServerError
        );
        let v = verdict(Status::Failed, 3, None);
        assert_eq!(
            Cause::of(&v, none, None, Recalled::Nothing),
            Cause::ServerError
        );
        // Nothing at all after the CQ.
        let v = verdict(Status::Failed, 1, None);
        assert_eq!(
            Cause::of(&v, none, None, Recalled::Nothing),
            Cause::NoResponse
        );
        // An answered upstream but no response to the client.
        let v = verdict(Status::Failed, 13, None);
        assert_eq!(
            Cause::of(&v, summary(&[Answered]), None, Recalled::Nothing),
            Cause::NoResponse
        );
    }

    #[test]
    fn sample_loss_is_never_a_dns_failure() {
        let none = AttemptSummary::default();
        for (loss, cause) in [
            (LossReason::AnalyserQueueFull, Cause::AnalyserLoss),
            (LossReason::SessionTableFull, Cause::AnalyserLoss),
            (LossReason::SenderLoss, Cause::SenderLoss),
            (LossReason::ClientQueryMissing, Cause::SenderLoss),
            (LossReason::UpstreamResponseMissing, Cause::SenderLoss),
            (LossReason::UpstreamQueryMissing, Cause::SenderLoss),
            (LossReason::ClientResponseMissing, Cause::SenderLoss),
        ] {
            let v = verdict(Status::SampleLoss, 5, Some(loss));
            assert_eq!(
                Cause::of(&v, summary(&[Timeout]), None, Recalled::Nothing),
                cause,
                "{loss:?}"
            );
            assert_eq!(
                Cause::of(&v, none, None, Recalled::Nothing),
                cause,
                "{loss:?}"
            );
        }
    }

    #[test]
    fn attempt_outcomes_follow_the_verdict_rcodes() {
        assert_eq!(AttemptOutcome::of(false, None), Timeout);
        assert_eq!(AttemptOutcome::of(true, Some(0)), Answered);
        assert_eq!(AttemptOutcome::of(true, Some(3)), Answered);
        assert_eq!(AttemptOutcome::of(true, None), Answered);
        assert_eq!(AttemptOutcome::of(true, Some(2)), ErrorRcode);
        assert_eq!(AttemptOutcome::of(true, Some(5)), ErrorRcode);
    }
}
