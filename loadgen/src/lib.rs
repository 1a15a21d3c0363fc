//! dnstap-loadgen: emulates CoreDNS pods sending dnstap over Frame Streams, records the ground
//! truth of every session, and verifies the analyser's output against it.

pub mod dnswire;
pub mod gen;
pub mod rng;
pub mod run;
pub mod send;
pub mod verify;
