pub mod framestream;
pub mod correlate;
pub mod dns;
pub mod dnstap;
pub mod metrics;
pub mod output;
pub mod ingest;
pub mod pipeline;
