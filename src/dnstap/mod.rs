//! dnstap payloads become the `Event`s the correlator consumes.
//!
//! - `wire`: hand-written protobuf walks: the hot path's scan of only the fields correlation
//!   reads (`scan`), and `decode_message`'s walk of a whole message;
//! - `decode`: full decoding for rendering (a walk of the fields senders send, the generated
//!   `pb` code for the rest), decoding errors, and dnstap's field encodings (`time`, `socket`,
//!   `ip`);
//! - `facts`: where the fields the diagnosis reads lie in a message, recorded by the scan;
//! - `event`: the `Event`, its `Role` and key: the contract between ingest and correlate;
//! - `sender`: what each sender is known to do, one table row per sender;
//! - `sources`: interned sender identities.

mod decode;
mod event;
mod facts;
pub mod pb;
mod sender;
mod sources;
mod wire;

#[cfg(test)]
pub(crate) use decode::decode_generated;
pub use decode::{decode, decode_message, decode_message_into, ip, socket, time, DecodeError};
pub use event::{Event, MessageSpan, Nanos, PeerKey, Recollection, Role, StreamEnded, StreamId};
pub use facts::{MessageFacts, StoredFields};
pub use pb::mod_Message::Type as MessageType;
pub use pb::{Dnstap, Message as DnstapMessage, SocketProtocol};
pub use sender::{SenderProfile, SenderTraits};
pub use sources::{IdentityLimit, Liveness, SourceId, SourceRegistry};
#[cfg(test)]
pub(crate) use wire::walk_message;
pub use wire::{
    query_message_field, scan, scan_extra, scan_into, scan_message, Encoded, MessageFields,
    TapFields, MAX_EXTRA,
};
