pub mod correlate;
pub mod dns;
pub mod dnstap;
pub mod framestream;
pub mod ingest;
pub mod metrics;
pub mod output;
pub mod pipeline;
