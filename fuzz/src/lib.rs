//! Fuzz properties of dnstap-analyser, one module per target. Each `check` takes arbitrary
//! bytes and panics when a property fails; the AFL++ binaries in `src/bin` call them, and so
//! does `replay` for the regression inputs and for AFL's queues and crashes.

pub mod dns_question;
pub mod dnstap_scan;
pub mod framestream;
pub mod pipeline;

/// A target's property: panics when `data` breaks it.
pub type Check = fn(data: &[u8]);

/// The targets by name, as the binaries and `fuzz/regressions/<target>/` are named.
pub const TARGETS: [(&str, Check); 4] = [
    ("framestream", framestream::check),
    ("dnstap_scan", dnstap_scan::check),
    ("dns_question", dns_question::check),
    ("pipeline", pipeline::check),
];
